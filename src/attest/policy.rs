//! The PCR policy of enrollment: which PCRs a quote must cover (`sha256:0,1,2,3,4,5,6,7`,
//! as tpm2-tools writes a selection) and, optionally, golden values per PCR index that the
//! reported values must match (any one of the values listed for an index).

use std::collections::BTreeMap;

use super::alg;

/// Highest PCR index (TPM 2.0 PC Client platforms have 24 PCRs).
const MAX_PCR: u32 = 23;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrPolicy {
    /// TPM_ALG_ID of the PCR bank.
    pub bank: u16,
    /// Sorted, without duplicates.
    pub indices: Vec<u32>,
    /// Index → accepted digests.
    pub golden: BTreeMap<u32, Vec<Vec<u8>>>,
}

/// (name, TPM_ALG_ID, digest size) of the banks keygate reads (a SHA-1 bank is not
/// accepted: its values could be forged by collision).
const BANKS: [(&str, u16, usize); 2] = [("sha256", alg::SHA256, 32), ("sha384", alg::SHA384, 48)];

impl PcrPolicy {
    /// Parses a selection like `sha256:0,1,2,7` and golden values (index as text → hex
    /// digests). Every golden index must be in the selection.
    pub fn parse(selection: &str, golden: &BTreeMap<String, Vec<String>>) -> Result<PcrPolicy, String> {
        let (bank_name, list) = selection
            .split_once(':')
            .ok_or_else(|| format!("pcr_selection {selection:?} is not like sha256:0,1,2,3"))?;
        let (_, bank, size) = BANKS
            .iter()
            .find(|(n, _, _)| *n == bank_name)
            .ok_or_else(|| format!("PCR bank {bank_name:?} is not sha256 or sha384"))?;
        let mut indices = Vec::new();
        for part in list.split(',') {
            let i: u32 = part
                .trim()
                .parse()
                .ok()
                .filter(|i| *i <= MAX_PCR)
                .ok_or_else(|| format!("PCR index {part:?} is not 0 to {MAX_PCR}"))?;
            indices.push(i);
        }
        indices.sort_unstable();
        indices.dedup();
        let mut parsed = BTreeMap::new();
        for (k, values) in golden {
            let i: u32 = k
                .parse()
                .ok()
                .filter(|i| indices.contains(i))
                .ok_or_else(|| format!("pcr_policy index {k:?} is not in pcr_selection {selection}"))?;
            if values.is_empty() {
                return Err(format!("pcr_policy index {i} lists no value"));
            }
            let mut vs = Vec::new();
            for v in values {
                let d = hex::decode(v)
                    .ok()
                    .filter(|d| d.len() == *size)
                    .ok_or_else(|| format!("pcr_policy value {v:?} of PCR {i} is not {size} bytes of hex"))?;
                vs.push(d);
            }
            parsed.insert(i, vs);
        }
        Ok(PcrPolicy {
            bank: *bank,
            indices,
            golden: parsed,
        })
    }

    /// The bank's name as in a selection (`sha256`).
    pub fn bank_name(&self) -> &'static str {
        BANKS
            .iter()
            .find(|(_, b, _)| *b == self.bank)
            .map(|(n, _, _)| *n)
            .unwrap_or("sha256")
    }

    /// The digest size of the bank.
    pub fn digest_size(&self) -> usize {
        BANKS
            .iter()
            .find(|(_, b, _)| *b == self.bank)
            .map(|(_, _, s)| *s)
            .unwrap_or(32)
    }

    /// The selection as tpm2-tools writes it: `sha256:0,1,2`.
    pub fn selection(&self) -> String {
        let list: Vec<String> = self.indices.iter().map(u32::to_string).collect();
        format!("{}:{}", self.bank_name(), list.join(","))
    }

    /// Parses the reported values of the client (`{"sha256": {"0": "<hex>", ...}}`): exactly
    /// the selected bank and indices, each a digest of the bank's size.
    pub fn parse_values(
        &self,
        pcrs: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<BTreeMap<u32, Vec<u8>>, String> {
        let bank = self.bank_name();
        if pcrs.len() != 1 || !pcrs.contains_key(bank) {
            return Err(format!("pcrs must hold exactly the bank {bank}"));
        }
        let mut out = BTreeMap::new();
        for (k, v) in pcrs.get(bank).into_iter().flatten() {
            let i: u32 = k
                .parse()
                .ok()
                .filter(|i| self.indices.contains(i))
                .ok_or_else(|| format!("pcrs has index {k:?}, which is not in {}", self.selection()))?;
            let d = hex::decode(v)
                .ok()
                .filter(|d| d.len() == self.digest_size())
                .ok_or_else(|| format!("pcrs value of PCR {i} is not {} bytes of hex", self.digest_size()))?;
            out.insert(i, d);
        }
        if out.len() != self.indices.len() {
            return Err(format!("pcrs must give every PCR of {}", self.selection()));
        }
        Ok(out)
    }

    /// Do the (quote-checked) values satisfy the golden values? Names the first PCR that does
    /// not.
    pub fn check(&self, values: &BTreeMap<u32, Vec<u8>>) -> Result<(), String> {
        for (i, accepted) in &self.golden {
            let ok = values.get(i).is_some_and(|v| accepted.iter().any(|a| a == v));
            if !ok {
                return Err(format!("PCR {i} does not hold a value the PCR policy accepts"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_checks_and_refuses() {
        let mut golden = BTreeMap::new();
        golden.insert("7".to_string(), vec!["00".repeat(32), "11".repeat(32)]);
        let p = PcrPolicy::parse("sha256:7,0,1,1", &golden).unwrap();
        assert_eq!(p.selection(), "sha256:0,1,7");
        let mut v = BTreeMap::new();
        v.insert(0, vec![0; 32]);
        v.insert(1, vec![0; 32]);
        v.insert(7, vec![0x11; 32]);
        assert!(p.check(&v).is_ok());
        v.insert(7, vec![0x22; 32]);
        assert!(p.check(&v).unwrap_err().contains("PCR 7"));
        for bad in ["sha256", "md5:0", "sha1:0", "sha256:24", "sha256:x", "sha256:"] {
            assert!(PcrPolicy::parse(bad, &BTreeMap::new()).is_err(), "{bad}");
        }
        let mut g = BTreeMap::new();
        g.insert("9".to_string(), vec!["00".repeat(32)]);
        assert!(PcrPolicy::parse("sha256:0", &g).is_err());
        g.insert("0".to_string(), vec!["00".repeat(20)]);
        g.remove("9");
        assert!(PcrPolicy::parse("sha256:0", &g).is_err());

        let mut reported = BTreeMap::new();
        let mut bank = BTreeMap::new();
        for i in ["0", "1", "7"] {
            bank.insert(i.to_string(), "ab".repeat(32));
        }
        reported.insert("sha256".to_string(), bank.clone());
        assert_eq!(p.parse_values(&reported).unwrap().len(), 3);
        bank.remove("7");
        reported.insert("sha256".to_string(), bank.clone());
        assert!(p.parse_values(&reported).is_err());
        bank.insert("7".into(), "ab".repeat(31));
        reported.insert("sha256".to_string(), bank);
        assert!(p.parse_values(&reported).is_err());
    }
}
