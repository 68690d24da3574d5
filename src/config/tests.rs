//! Unit tests of configuration parsing and validation.

use super::*;

#[test]
fn empty_file_gives_embedded_defaults() {
    let c = Config::parse("").unwrap();
    assert!(c.is_embedded());
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.issuer(), "http://127.0.0.1:8080");
    assert_eq!(c.tokens.leeway_seconds, 5);
    assert_eq!(c.pkcs11().token_label.as_deref(), Some("keygate"));
}

#[test]
fn unknown_fields_are_refused() {
    let e = Config::parse("lisen = \"127.0.0.1:1\"").unwrap_err();
    assert!(e.contains("lisen"), "{e}");
    let e =
        Config::parse("[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin={file=\"/p\"}\nslot=0").unwrap_err();
    assert!(e.contains("slot"), "{e}");
    // a PIN value in the config text is not a thing, and the error does not repeat it
    for text in [
        "[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin=\"1234\"",
        "[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin=987654",
        "backend=\"s3cr3t-typed-here\"",
    ] {
        let e = Config::parse(text).unwrap_err();
        for secret in ["1234", "987654", "s3cr3t"] {
            assert!(!e.contains(secret), "{e}");
        }
        assert!(e.starts_with("line "), "{e}");
    }
    // a value that itself holds ", expected" is hidden whole
    let e = Config::parse("backend=\"x, expected s3cr3t\"").unwrap_err();
    assert!(!e.contains("s3cr3t"), "{e}");
    let e = Config::parse("[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin=\"1234\"").unwrap_err();
    assert!(
        e.starts_with("line 4: unknown variant (value not shown), expected"),
        "{e}"
    );
}

#[test]
fn bad_values_are_refused() {
    for text in [
        "[api_tokens]\ndefault_ttl_seconds=0",
        "[api_tokens]\ncache_lease_ms=10001",
        "[ca]\ncountry=\"Germany\"",
        "[ca]\nlifetime_days=0",
        "[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin={file=\"/p\"}\nacquire_timeout_ms=0",
        "[pkcs11]\nmodule=\"/x\"\npin={file=\"/p\"}",
        "issuer=\"https://x.example/\"",
        "[tokens]\nrevocation_list_ttl_seconds=0",
        "[tokens]\nrevocation_list_ttl_seconds=99999999999",
    ] {
        let c = Config::parse(text).unwrap();
        assert!(c.validate().is_err(), "{text}");
    }
    assert!(Config::parse("[store]\nsynchronous=\"off\"").is_err());
}

#[test]
fn backend_tables_must_match_the_backend() {
    let tpm = "backend = \"tpm\"\n[tpm]\ntcti = \"swtpm:host=127.0.0.1,port=2321\"";
    let c = Config::parse(tpm).unwrap();
    c.validate().unwrap();
    assert!(!c.is_embedded());
    assert_eq!(c.tpm.as_ref().unwrap().handle_base, 0x8101_0100);
    let no_table = Config::parse("backend = \"tpm\"").unwrap();
    assert!(no_table.validate().unwrap_err().to_string().contains("[tpm]"));
    let stray = Config::parse("[tpm]\ntcti = \"device:/dev/tpmrm0\"").unwrap();
    assert!(stray.validate().unwrap_err().to_string().contains("backend"));
    let both = format!("{tpm}\n[pkcs11]\nmodule=\"/x\"\ntoken_label=\"a\"\npin={{file=\"/p\"}}");
    assert!(Config::parse(&both).unwrap().validate().is_err());
    assert!(Config::parse("backend = \"hsm\"").is_err());
}

#[test]
fn store_urls_and_passwords() {
    let c = Config::parse("").unwrap();
    assert!(c.store_is_sqlite());
    assert_eq!(c.store_options().unwrap().batch_hold, crate::store::HOLD);
    let off = Config::parse("[store]\nbatch_hold_ms = 0").unwrap();
    assert!(off.validate().is_ok());
    assert!(off.store_options().unwrap().batch_hold.is_zero());
    assert!(c.store_url().ends_with("keygate-data/keygate.db"));
    let pg = Config::parse(
        "[store]\nurl = \"postgres://kg@db:5432/keygate\"\npassword = { env = \"KG_TEST_NO_SUCH_VAR\" }",
    )
    .unwrap();
    pg.validate().unwrap();
    assert!(!pg.store_is_sqlite());
    // the password is read when the store is opened, and its absence is one clear line
    let e = pg.store_options().unwrap_err().to_string();
    assert!(
        e.contains("[store] password") && e.contains("KG_TEST_NO_SUCH_VAR"),
        "{e}"
    );
    for bad in [
        "[store]\nurl = \"mysql://db/x\"",
        "[store]\nurl = \"sqlite:///x.db\"\npassword = { file = \"/p\" }",
        "[store]\nmax_connections = 0",
        "[store]\nbatch_hold_ms = 51",
    ] {
        assert!(Config::parse(bad).unwrap().validate().is_err(), "{bad}");
    }
    // a password in the URL never shows in an error
    let e = Config::parse("[store]\nurl = \"postgresql://kg:s3cret@db/x?sslmode=nonsense\"")
        .unwrap()
        .store_options()
        .map(|_| ())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!e.contains("s3cret"), "{e}");
}

#[test]
fn every_override_is_listed_once() {
    let vars: std::collections::BTreeSet<_> = ENV_OVERRIDES.iter().map(|(v, _)| *v).collect();
    assert_eq!(vars.len(), ENV_OVERRIDES.len());
    let text = include_str!("mod.rs");
    // KEYGATE_CONFIG is read by the command line (clap), before any file is.
    for (var, _) in ENV_OVERRIDES.iter().filter(|(_, f)| !f.starts_with('(')) {
        assert!(
            text.matches(&format!("\"{var}\"")).count() >= 2,
            "{var} is listed but never read"
        );
    }
}

#[test]
fn conflicting_ttls_are_refused() {
    let c = Config::parse("[tokens]\ndefault_ttl_seconds=100\nmax_ttl_seconds=10").unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("exceeds"));
}

#[test]
fn reference_configs_parse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/hsm-config");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let c = Config::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            c.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5, "expected the reference configs, found {n}");
}

#[test]
fn http_workers_default_to_half_the_cores() {
    let auto = Config::parse("").unwrap().http;
    assert_eq!([1, 2, 3, 8].map(|cores| auto.worker_threads(cores)), [1, 1, 1, 4]);
    let set = Config::parse("[http]\nworkers = 3").unwrap().http;
    assert_eq!(set.worker_threads(2), 3);
}
