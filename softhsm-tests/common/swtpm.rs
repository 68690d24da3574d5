//! One swtpm per test: free ports, a temporary state folder, killed on drop (also when the
//! test fails). Every state folder's name starts with `keygate-test-swtpm` so the suite can
//! check that no simulator outlives it (softhsm-tests/run-all.sh).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub struct Swtpm {
    child: Option<Child>,
    pub port: u16,
    pub state: TempDir,
}

/// A port P with P and P+1 both free (swtpm's server and control channels), outside the
/// ephemeral range so that a restart finds them free again.
fn free_port_pair() -> u16 {
    super::free_ports(2)
}

/// A state folder whose name the suite's leak check knows.
fn state_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("keygate-test-swtpm")
        .tempdir()
        .unwrap()
}

fn spawn(port: u16, state: &Path) -> Child {
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--server"])
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .args(["--flags", "not-need-init,startup-clear"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("swtpm is installed (softhsm-tests/install-deps.sh)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "swtpm did not start on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Swtpm {
    pub fn start() -> Swtpm {
        Swtpm::run(state_dir())
    }

    /// Runs a simulator on `state` and free ports.
    fn run(state: TempDir) -> Swtpm {
        let port = free_port_pair();
        let child = spawn(port, state.path());
        Swtpm {
            child: Some(child),
            port,
            state,
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Kills the simulator (the TPM "goes away"); its state folder stays.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the simulator where it is (SIGSTOP): a command sent now hangs, on an open
    /// connection, until [`Swtpm::resume`].
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            super::signal(c, libc::SIGSTOP);
        }
    }

    /// Lets a paused simulator go on (SIGCONT): the hanging command completes.
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            super::signal(c, libc::SIGCONT);
        }
    }

    /// Starts it again on the same port and state folder.
    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(spawn(self.port, self.state.path()));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TPM manufacturer for tests: a CA (root and intermediate) that `swtpm-localca` makes in
/// a folder of its own, and a folder with only its certificates, which keygate trusts
/// (`enroll.ca_dir`).
pub struct TestCa {
    pub state: TempDir,
    pub bundle: TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        TestCa {
            state: tempfile::tempdir().unwrap(),
            bundle: tempfile::tempdir().unwrap(),
        }
    }
}

impl Swtpm {
    /// A TPM as it leaves the factory: `swtpm_setup` makes its RSA-2048 and ECC P-384 EKs
    /// and their certificates (NV 0x01c00002, 0x01c00016), issued by `ca`.
    pub fn manufactured(ca: &TestCa) -> Swtpm {
        let state = state_dir();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("softhsm-tests/swtpm-ekcert.sh");
        let out = Command::new("sh")
            .arg(script)
            .arg(state.path())
            .arg(ca.state.path())
            .arg("rsa")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "swtpm-ekcert.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in ["swtpm-localca-rootca-cert.pem", "issuercert.pem"] {
            std::fs::copy(ca.state.path().join(f), ca.bundle.path().join(f)).unwrap();
        }
        Swtpm::run(state)
    }
}
