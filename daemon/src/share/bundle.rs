//! The bundle: proven policies with the evidence that proved them, in one JSON file another machine
//! can import (docs/sharing.md).
//!
//! A bundle is data and is trusted for nothing: every policy is validated and re-hashed, each entry
//! carries a hash over its policy hash and evidence, and the bundle a hash over its entries. Any
//! mismatch refuses the whole bundle (a file someone edited is not half-imported). What passes is
//! still only a candidate on the receiving machine until it is verified there.

use crate::policy::Policy;
use crate::probe::Device;
use crate::store::{Best, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const FORMAT: &str = "tilewise.bundle/1";
/// The largest bundle file read (a bundle of every model's best with its samples is kilobytes).
pub const MAX_BUNDLE_BYTES: u64 = 16 * 1024 * 1024;
/// Entries in one bundle at most.
pub const MAX_ENTRIES: usize = 1000;

/// The machine a bundle was exported from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exporter {
    pub device: String,
    pub chip: Option<String>,
    pub backend: String,
    /// The probed device (cores, caches, memory...), so a receiver can judge how similar it is.
    pub device_info: Value,
    pub tilewise: String,
}

/// What proved a policy on the exporting machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    pub device: String,
    pub chip: Option<String>,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_name: Option<String>,
    pub mlx: String,
    pub backend: String,
    pub ratio: f64,
    pub lo: f64,
    pub hi: f64,
    /// Per-pair ratios (stock time / candidate time) of the promoting measurement, per workload.
    pub ratios: std::collections::BTreeMap<String, Vec<f64>>,
    pub promoted_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remeasured_at: Option<String>,
    /// The policy in words ("q/k/v fused ..."), as the exporter summarized it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub policy: Value,
    /// The policy's content hash.
    pub hash: String,
    pub evidence: Evidence,
    /// `sha256:` over the policy hash and the canonical JSON of the evidence.
    pub entry_hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub format: String,
    pub created_at: String,
    pub from: Exporter,
    pub entries: Vec<Entry>,
    /// `sha256:` over the exporter's canonical JSON and the entry hashes, in order.
    pub bundle_hash: String,
}

fn sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
}

fn canonical<T: Serialize>(v: &T) -> String {
    // serde_json's map is a BTreeMap in this build: keys come out sorted (as for policy hashes).
    serde_json::to_string(&serde_json::to_value(v).expect("serializes")).expect("serializes")
}

fn entry_hash(hash: &str, evidence: &Evidence) -> String {
    sha256(&[hash.as_bytes(), canonical(evidence).as_bytes()])
}

fn bundle_hash(from: &Exporter, entries: &[Entry]) -> String {
    let from = canonical(from);
    let mut parts: Vec<&[u8]> = vec![FORMAT.as_bytes(), from.as_bytes()];
    parts.extend(entries.iter().map(|e| e.entry_hash.as_bytes()));
    sha256(&parts)
}

/// The per-pair ratios of a best's promoting measurement, per workload.
fn ratios_of(store: &Store, best: &Best) -> Result<std::collections::BTreeMap<String, Vec<f64>>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    let Some(candidate) = best.candidate_id else { return Ok(out) };
    let Some(m) = store.measurements(candidate)?.into_iter().rev().find(|m| m.ratio.is_some()) else { return Ok(out) };
    let mut by_pair: std::collections::BTreeMap<(String, u32), (Option<f64>, Option<f64>)> = Default::default();
    for s in store.samples(m.id)? {
        let e = by_pair.entry((s.workload.clone(), s.pair)).or_default();
        match s.arm {
            crate::store::Arm::Stock => e.0 = Some(s.seconds),
            crate::store::Arm::Candidate => e.1 = Some(s.seconds),
        }
    }
    for ((workload, _), (stock, cand)) in by_pair {
        if let (Some(s), Some(c)) = (stock, cand) {
            if c > 0.0 {
                out.entry(workload).or_insert_with(Vec::new).push(s / c);
            }
        }
    }
    Ok(out)
}

/// A bundle of this machine's proven policies (optionally of one model).
pub fn export(store: &Store, device: &Device, device_fingerprint: &str, model: Option<&str>) -> Result<Bundle, StoreError> {
    let names: std::collections::HashMap<String, Option<String>> =
        store.models_seen()?.into_iter().map(|m| (m.fingerprint, m.name)).collect();
    let mut entries = vec![];
    for best in store.bests_of_device(device_fingerprint, model)? {
        let evidence = Evidence {
            device: best.key.device.clone(),
            chip: device.chip.clone(),
            model: best.key.model.clone(),
            model_name: names.get(&best.key.model).cloned().flatten(),
            mlx: best.key.mlx.clone(),
            backend: best.key.backend.clone(),
            ratio: best.ratio,
            lo: best.lo,
            hi: best.hi,
            ratios: ratios_of(store, &best)?,
            promoted_at: best.promoted_at.clone(),
            remeasured_at: best.remeasured_at.clone(),
            summary: best.summary.as_ref().map(|s| s.text.clone()),
        };
        entries.push(Entry { entry_hash: entry_hash(&best.hash, &evidence), hash: best.hash, policy: best.policy, evidence });
    }
    let from = Exporter {
        device: device_fingerprint.to_string(),
        chip: device.chip.clone(),
        backend: device.backend.as_str().to_string(),
        device_info: serde_json::to_value(device).unwrap_or(Value::Null),
        tilewise: crate::ipc::protocol::VERSION.to_string(),
    };
    let bundle_hash = bundle_hash(&from, &entries);
    Ok(Bundle { format: FORMAT.into(), created_at: crate::store::now(), from, entries, bundle_hash })
}

/// Parses and checks a bundle: the format, every policy valid with the hash it claims, every entry
/// hash, the bundle hash. The first problem refuses the whole bundle, named.
pub fn check(text: &str) -> Result<Bundle, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("not a tilewise bundle (not JSON: {e})"))?;
    if value.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(format!("not a tilewise bundle (format is {}, expected {FORMAT:?})", value.get("format").unwrap_or(&json!(null))));
    }
    let bundle: Bundle = serde_json::from_value(value).map_err(|e| format!("malformed bundle: {e}"))?;
    if bundle.entries.len() > MAX_ENTRIES {
        return Err(format!("a bundle holds at most {MAX_ENTRIES} policies (this one {})", bundle.entries.len()));
    }
    for (i, e) in bundle.entries.iter().enumerate() {
        let policy = Policy::from_value(&e.policy).map_err(|err| format!("entry {i}: invalid policy: {err}"))?;
        let actual = policy.content_hash();
        if actual != e.hash {
            return Err(format!("tampered bundle: entry {i}'s policy hashes to {actual}, not {} as it claims", e.hash));
        }
        if entry_hash(&e.hash, &e.evidence) != e.entry_hash {
            return Err(format!("tampered bundle: entry {i}'s evidence does not match its entry hash"));
        }
        let t = &policy.target;
        if (t.model.as_str(), t.mlx.as_str(), t.backend.as_str())
            != (e.evidence.model.as_str(), e.evidence.mlx.as_str(), e.evidence.backend.as_str())
        {
            return Err(format!("entry {i}: the policy's target does not match its evidence"));
        }
        if ![e.evidence.ratio, e.evidence.lo, e.evidence.hi].iter().all(|x| x.is_finite()) {
            return Err(format!("entry {i}: evidence figures must be finite numbers"));
        }
    }
    if bundle_hash(&bundle.from, &bundle.entries) != bundle.bundle_hash {
        return Err("tampered bundle: the bundle hash does not match its entries".into());
    }
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bundle() -> Bundle {
        let mut policy = Policy::native();
        policy.target.model = "mdl-1".into();
        policy.target.mlx = "0.32.4".into();
        policy.target.backend = "cpu".into();
        policy.target.device = "dev-a".into();
        let evidence = Evidence {
            device: "dev-a".into(),
            chip: Some("Apple M3".into()),
            model: "mdl-1".into(),
            model_name: Some("org/m".into()),
            mlx: "0.32.4".into(),
            backend: "cpu".into(),
            ratio: 1.1,
            lo: 1.05,
            hi: 1.12,
            ratios: [("inference".to_string(), vec![1.1, 1.09])].into_iter().collect(),
            promoted_at: "2026-12-05T00:00:00.000Z".into(),
            remeasured_at: None,
            summary: None,
        };
        let hash = policy.content_hash();
        let entries = vec![Entry { entry_hash: entry_hash(&hash, &evidence), hash, policy: policy.to_value(), evidence }];
        let from = Exporter {
            device: "dev-a".into(),
            chip: Some("Apple M3".into()),
            backend: "cpu".into(),
            device_info: json!({}),
            tilewise: "0".into(),
        };
        let bundle_hash = bundle_hash(&from, &entries);
        Bundle { format: FORMAT.into(), created_at: "now".into(), from, entries, bundle_hash }
    }

    #[test]
    fn a_bundle_round_trips_and_any_edit_refuses_it_whole() {
        let b = sample_bundle();
        let text = serde_json::to_string_pretty(&b).unwrap();
        assert_eq!(check(&text).unwrap(), b);
        type Edit = Box<dyn Fn(&mut Value)>;
        let edits: [(&str, Edit); 4] = [
            ("policy", Box::new(|v| v["entries"][0]["policy"]["name"] = json!("edited"))),
            ("evidence", Box::new(|v| v["entries"][0]["evidence"]["lo"] = json!(1.5))),
            ("bundle", Box::new(|v| v["from"]["chip"] = json!("Apple M4 Max"))),
            ("entry dropped", Box::new(|v| v["entries"] = json!([]))),
        ];
        for (what, edit) in edits {
            let mut v: Value = serde_json::from_str(&text).unwrap();
            edit(&mut v);
            let err = check(&v.to_string()).unwrap_err();
            assert!(err.starts_with("tampered bundle"), "{what}: {err}");
        }
        assert!(check("{}").unwrap_err().contains("not a tilewise bundle"));
        assert!(check("not json").unwrap_err().contains("not JSON"));
    }
}
