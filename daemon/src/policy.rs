//! The policy: `tilewise.policy/1`, the one piece of data that flows from the search to the plugin.
//!
//! The JSON Schema in `schema/policy.schema.json` is the single definition, shared with the Python
//! evaluator. Validation runs that schema first (so both languages report the same structural errors),
//! then parses into the typed form, then applies the cross-field checks listed in `docs/policy.md`.
//! The daemon never executes anything from a policy: it is data only.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::fmt;
use std::sync::OnceLock;

/// Schema id carried in every policy document.
pub const SCHEMA_ID: &str = "tilewise.policy/1";
/// The shared JSON Schema file, compiled in so the binary cannot drift from the repo copy.
pub const SCHEMA_JSON: &str = include_str!("../../schema/policy.schema.json");
/// The built-in policy that is always available.
pub const NATIVE_JSON: &str = include_str!("../../schema/native.policy.json");
/// Largest M a GEMV kernel plan may serve (decode and small batches).
pub const GEMV_MAX_M: u64 = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub schema: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub target: Target,
    pub matmul: Matmul,
    /// Which sibling linear layers run as one matmul. Absent from every policy that fuses nothing,
    /// so those keep their content hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion: Option<Fusion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<Training>,
}

/// What the policy was proven on. `"*"` matches anything (only the built-in native policy uses it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub device: String,
    pub model: String,
    pub mlx: String,
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Matmul {
    pub rules: Vec<Rule>,
    pub default: Plan,
}

/// Inclusive `[lo, hi]`; `hi = None` is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range(pub u64, pub Option<u64>);

impl Range {
    pub fn contains(&self, v: u64) -> bool {
        v >= self.0 && self.1.is_none_or(|hi| v <= hi)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<Range>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<Range>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<Range>,
    pub plan: Plan,
}

impl Rule {
    pub fn matches(&self, m: u64, n: u64, k: u64) -> bool {
        let ok = |r: &Option<Range>, v| r.as_ref().is_none_or(|r| r.contains(v));
        ok(&self.m, m) && ok(&self.n, n) && ok(&self.k, k)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Plan {
    /// MLX's own matmul, bit-identical to stock.
    Native,
    /// Graph-level tiling into MLX ops; `None` leaves that axis whole.
    Split { tile_m: Option<u32>, tile_n: Option<u32>, tile_k: Option<u32> },
    /// A custom kernel whose tiles the policy chooses.
    Kernel(KernelPlan),
}

impl Plan {
    pub fn kind(&self) -> &'static str {
        match self {
            Plan::Native => "native",
            Plan::Split { .. } => "split",
            Plan::Kernel(_) => "kernel",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPlan {
    pub backend: KernelBackend,
    pub family: KernelFamily,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_per_block: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_m: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_k: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warps: Option<u32>,
    pub vector_width: u32,
    pub split_k: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelBackend {
    Cuda,
    Metal,
}

impl KernelBackend {
    pub fn as_str(&self) -> &'static str {
        match self {
            KernelBackend::Cuda => "cuda",
            KernelBackend::Metal => "metal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFamily {
    Gemv,
    Gemm,
}

/// Sibling fusion: each group's members (direct child layers of every module whose path matches
/// `scope`, `*` standing for one numeric segment) run as one matmul over their concatenated weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fusion {
    pub groups: Vec<FusionGroup>,
    /// `Some(false)`: fused for inference only. Absent: fused for training too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FusionGroup {
    pub scope: String,
    pub members: Vec<String>,
}

impl Fusion {
    /// Whether the fused layers also run fused while training.
    pub fn fuses_training(&self) -> bool {
        self.training.unwrap_or(true)
    }
}

/// Whether two fusion scopes can match the same module path (`*` = one numeric segment).
pub fn scopes_overlap(a: &str, b: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let (sa, sb): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    sa.len() == sb.len() && sa.iter().zip(&sb).all(|(x, y)| x == y || (*x == "*" && digits(y)) || (*y == "*" && digits(x)))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_step_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Training {
    #[serde(default)]
    pub loss_chunk_tokens: Option<u32>,
}

/// One problem found in a policy, located by a JSON path such as `matmul.rules[2].plan.tile_m`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

/// Why a policy was refused: every problem found, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyError {
    pub errors: Vec<FieldError>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy: ")?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{}: {}", e.path, e.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl PolicyError {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        PolicyError { errors: vec![FieldError { path: path.into(), message: message.into() }] }
    }
}

fn compiled_schema() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let schema: Value = serde_json::from_str(SCHEMA_JSON).expect("schema/policy.schema.json is valid JSON");
        jsonschema::validator_for(&schema).expect("schema/policy.schema.json is a valid JSON Schema")
    })
}

/// `/matmul/rules/0/plan` → `matmul.rules[0].plan` (the path style both languages print).
fn dotted_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg.replace("~1", "/").replace("~0", "~"));
        }
    }
    if out.is_empty() {
        "(root)".into()
    } else {
        out
    }
}

impl Policy {
    /// The built-in native policy.
    pub fn native() -> Policy {
        serde_json::from_str(NATIVE_JSON).expect("schema/native.policy.json parses")
    }

    /// Parses and fully validates a policy document (schema, types, cross-field checks).
    pub fn from_json_str(text: &str) -> Result<Policy, PolicyError> {
        let value: Value = serde_json::from_str(text).map_err(|e| PolicyError::one("(root)", format!("not JSON: {e}")))?;
        Policy::from_value(&value)
    }

    pub fn from_value(value: &Value) -> Result<Policy, PolicyError> {
        let errors: Vec<FieldError> = compiled_schema()
            .iter_errors(value)
            .map(|e| FieldError { path: dotted_path(e.instance_path().as_str()), message: e.to_string() })
            .collect();
        if !errors.is_empty() {
            return Err(PolicyError { errors });
        }
        let policy: Policy = serde_json::from_value(value.clone())
            .map_err(|e| PolicyError::one("(root)", format!("does not match the policy types: {e}")))?;
        policy.check_semantics(None)?;
        Ok(policy)
    }

    /// Validates for a machine whose MLX backend is `backend`: a kernel plan for another backend is
    /// refused here, not at run time.
    pub fn validate_for_backend(&self, backend: &str) -> Result<(), PolicyError> {
        self.check_semantics(Some(backend))
    }

    fn check_semantics(&self, machine_backend: Option<&str>) -> Result<(), PolicyError> {
        let mut errors = Vec::new();
        let mut push = |path: String, message: String| errors.push(FieldError { path, message });
        if let Some(mb) = machine_backend {
            if self.target.backend != "*" && self.target.backend != mb {
                push("target.backend".into(), format!("policy is for {}, this machine runs {mb}", self.target.backend));
            }
        }
        let check_plan = |path: &str, plan: &Plan, m_hi: Option<u64>, push: &mut dyn FnMut(String, String)| {
            if let Plan::Kernel(k) = plan {
                let kb = k.backend.as_str();
                let want = machine_backend.unwrap_or(self.target.backend.as_str());
                if want != "*" && kb != want {
                    push(format!("{path}.backend"), format!("kernel backend {kb} not available on {want}"));
                }
                match k.family {
                    KernelFamily::Gemv => {
                        if k.rows_per_block.is_none() {
                            push(format!("{path}.rows_per_block"), "gemv needs rows_per_block".into());
                        }
                        match m_hi {
                            Some(hi) if hi <= GEMV_MAX_M => {}
                            _ => push(
                                path.to_string(),
                                format!("gemv serves only M <= {GEMV_MAX_M}: put it in a rule whose m range ends at or below {GEMV_MAX_M}"),
                            ),
                        }
                    }
                    KernelFamily::Gemm => {
                        for (name, v) in [("block_m", k.block_m), ("block_n", k.block_n), ("block_k", k.block_k), ("warps", k.warps)] {
                            if v.is_none() {
                                push(format!("{path}.{name}"), format!("gemm needs {name}"));
                            }
                        }
                    }
                }
            }
        };
        for (i, rule) in self.matmul.rules.iter().enumerate() {
            for (axis, r) in [("m", &rule.m), ("n", &rule.n), ("k", &rule.k)] {
                if let Some(Range(lo, Some(hi))) = r {
                    if lo > hi {
                        push(format!("matmul.rules[{i}].{axis}"), format!("lo > hi ({lo} > {hi})"));
                    }
                }
            }
            let m_hi = rule.m.and_then(|r| r.1);
            check_plan(&format!("matmul.rules[{i}].plan"), &rule.plan, m_hi, &mut push);
        }
        check_plan("matmul.default", &self.matmul.default, None, &mut push);
        // A layer joins one fusion group only.
        let groups = self.fusion.as_ref().map_or(&[][..], |f| &f.groups[..]);
        for (j, g) in groups.iter().enumerate() {
            for (i, h) in groups[..j].iter().enumerate() {
                if !scopes_overlap(&h.scope, &g.scope) {
                    continue;
                }
                if let Some(m) = g.members.iter().find(|m| h.members.contains(m)) {
                    push(format!("fusion.groups[{j}].members"), format!("{m} is already in fusion.groups[{i}] (a layer joins one group)"));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(PolicyError { errors })
        }
    }

    /// The plan for one matmul: the first matching rule, else the default.
    pub fn plan_for(&self, m: u64, n: u64, k: u64) -> &Plan {
        self.matmul.rules.iter().find(|r| r.matches(m, n, k)).map(|r| &r.plan).unwrap_or(&self.matmul.default)
    }

    /// True when every matmul runs native (no plan changes anything; fusion aside).
    pub fn is_all_native(&self) -> bool {
        self.matmul.default == Plan::Native && self.matmul.rules.iter().all(|r| r.plan == Plan::Native)
    }

    /// The fusion groups (empty when the policy fuses nothing).
    pub fn fusion_groups(&self) -> &[FusionGroup] {
        self.fusion.as_ref().map_or(&[], |f| &f.groups)
    }

    /// True when the policy changes nothing: every plan native and nothing fused.
    pub fn is_stock(&self) -> bool {
        self.is_all_native() && self.fusion_groups().is_empty()
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("policy serializes")
    }

    /// Canonical JSON: keys sorted, no whitespace (see docs/policy.md). serde_json's `Value` map is a
    /// BTreeMap in this build, so `to_string` sorts keys.
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(&self.to_value()).expect("policy serializes")
    }

    /// `sha256:<hex>` of the canonical JSON; equal to the Python evaluator's hash of the same document.
    pub fn content_hash(&self) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(self.canonical_json().as_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(rules: Value, default: Value) -> Value {
        json!({"schema": SCHEMA_ID, "target": {"device": "d1", "model": "m1", "mlx": "0.32.4", "backend": "cuda"},
               "matmul": {"rules": rules, "default": default}})
    }

    #[test]
    fn native_is_valid_and_all_native() {
        let p = Policy::native();
        Policy::from_value(&p.to_value()).unwrap();
        assert!(p.is_all_native());
        assert_eq!(p.plan_for(1, 896, 896), &Plan::Native);
    }

    #[test]
    fn first_matching_rule_wins() {
        let v = base(
            json!([{"m": [1, 1], "plan": {"kind": "native"}},
                   {"m": [2, null], "n": [100000, null], "plan": {"kind": "split", "tile_m": 512, "tile_n": 16384, "tile_k": null}}]),
            json!({"kind": "split", "tile_m": null, "tile_n": null, "tile_k": 256}),
        );
        let p = Policy::from_value(&v).unwrap();
        assert_eq!(p.plan_for(1, 151936, 896), &Plan::Native);
        assert_eq!(p.plan_for(7, 151936, 896), &Plan::Split { tile_m: Some(512), tile_n: Some(16384), tile_k: None });
        assert_eq!(p.plan_for(7, 896, 896), &Plan::Split { tile_m: None, tile_n: None, tile_k: Some(256) });
        assert!(!p.is_all_native());
    }

    #[test]
    fn schema_errors_name_the_field() {
        let v =
            base(json!([{"m": [1, 4], "plan": {"kind": "split", "tile_m": 0, "tile_n": null, "tile_k": null}}]), json!({"kind": "native"}));
        let err = Policy::from_value(&v).unwrap_err();
        assert!(err.errors.iter().any(|e| e.path.starts_with("matmul.rules[0].plan")), "{err}");
        let v = base(json!([]), json!({"kind": "warp-drive"}));
        let err = Policy::from_value(&v).unwrap_err();
        assert!(err.errors.iter().any(|e| e.path == "matmul.default"), "{err}");
        let mut v = base(json!([]), json!({"kind": "native"}));
        v["surprise"] = json!(1);
        assert!(Policy::from_value(&v).is_err());
    }

    #[test]
    fn cross_field_checks() {
        let v = base(json!([{"m": [9, 4], "plan": {"kind": "native"}}]), json!({"kind": "native"}));
        let err = Policy::from_value(&v).unwrap_err();
        assert_eq!(err.errors[0].path, "matmul.rules[0].m");

        let gemv = json!({"kind": "kernel", "backend": "cuda", "family": "gemv", "rows_per_block": 4, "vector_width": 8, "split_k": 1});
        // gemv as default (unbounded M) is refused; in a rule with m <= 16 it is fine.
        assert!(Policy::from_value(&base(json!([]), gemv.clone())).is_err());
        let ok = Policy::from_value(&base(json!([{"m": [1, 16], "plan": gemv.clone()}]), json!({"kind": "native"}))).unwrap();
        // ... but not on a machine without CUDA.
        let err = ok.validate_for_backend("metal").unwrap_err();
        assert!(err.errors.iter().any(|e| e.path == "target.backend"), "{err}");
        assert!(err.errors.iter().any(|e| e.path == "matmul.rules[0].plan.backend"), "{err}");
        ok.validate_for_backend("cuda").unwrap();

        let metal_on_cuda = json!({"kind": "kernel", "backend": "metal", "family": "gemm", "block_m": 32, "block_n": 32, "block_k": 16, "warps": 4, "vector_width": 4, "split_k": 1});
        let err = Policy::from_value(&base(json!([]), metal_on_cuda)).unwrap_err();
        assert!(err.errors[0].message.contains("not available on cuda"), "{err}");
        let gemm_missing = json!({"kind": "kernel", "backend": "cuda", "family": "gemm", "vector_width": 4, "split_k": 1});
        let err = Policy::from_value(&base(json!([]), gemm_missing)).unwrap_err();
        assert_eq!(err.errors.len(), 4, "{err}");
    }

    #[test]
    fn fusion_groups_validate_and_a_layer_joins_one_group() {
        let mut v = base(json!([]), json!({"kind": "native"}));
        v["fusion"] = json!({"groups": [{"scope": "model.layers.*.self_attn", "members": ["q_proj", "k_proj", "v_proj"]},
                                        {"scope": "model.layers.*.mlp", "members": ["gate_proj", "up_proj"]}]});
        let p = Policy::from_value(&v).unwrap();
        assert_eq!(p.fusion_groups().len(), 2);
        assert!(!p.is_stock() && p.is_all_native());
        // The same layer in two groups (overlapping scopes): refused, same message as Python.
        v["fusion"]["groups"][1] = json!({"scope": "model.layers.3.self_attn", "members": ["v_proj", "o_proj"]});
        let err = Policy::from_value(&v).unwrap_err();
        assert_eq!(err.errors[0].path, "fusion.groups[1].members");
        assert_eq!(err.errors[0].message, "v_proj is already in fusion.groups[0] (a layer joins one group)");
        // Structure: one member, a bad scope or member name.
        v["fusion"] = json!({"groups": [{"scope": "model.layers.*.mlp", "members": ["gate_proj"]}]});
        assert!(Policy::from_value(&v).is_err());
        v["fusion"] = json!({"groups": [{"scope": "model..mlp", "members": ["a", "b"]}]});
        assert!(Policy::from_value(&v).is_err());
        v["fusion"] = json!({"groups": [{"scope": "m", "members": ["a b", "c"]}]});
        assert!(Policy::from_value(&v).is_err());
        assert!(scopes_overlap("model.layers.*.mlp", "model.layers.7.mlp"));
        assert!(!scopes_overlap("model.layers.*.mlp", "model.layers.x.mlp"));
        assert!(!scopes_overlap("model.layers.*.mlp", "model.layers.*.self_attn"));
    }

    #[test]
    fn hash_is_canonical_and_pinned() {
        // Key order and whitespace do not change the hash. The Python evaluator pins the same value
        // (evaluator/tests/test_policy.py) so the two languages agree.
        let a = r#"{"schema":"tilewise.policy/1","target":{"device":"*","model":"*","mlx":"*","backend":"*"},"matmul":{"rules":[],"default":{"kind":"native"}},"name":"native"}"#;
        let b = "{ \"name\": \"native\", \"matmul\": {\"default\": {\"kind\": \"native\"}, \"rules\": []},\n \"target\": {\"backend\": \"*\", \"mlx\": \"*\", \"model\": \"*\", \"device\": \"*\"}, \"schema\": \"tilewise.policy/1\"}";
        let (pa, pb) = (Policy::from_json_str(a).unwrap(), Policy::from_json_str(b).unwrap());
        assert_eq!(pa.content_hash(), pb.content_hash());
        assert_eq!(pa.content_hash(), Policy::native().content_hash());
        assert_eq!(
            pa.canonical_json(),
            r#"{"matmul":{"default":{"kind":"native"},"rules":[]},"name":"native","schema":"tilewise.policy/1","target":{"backend":"*","device":"*","mlx":"*","model":"*"}}"#
        );
    }
}
