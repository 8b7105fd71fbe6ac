//! Measurements (one summary per candidate evaluation) and their raw samples (every timing).

use super::{json_col, now, to_json, CandidateId, Result, SessionId, Store, StoreError};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which side of an interleaved pair a sample timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arm {
    Stock,
    Candidate,
}

impl Arm {
    pub fn as_str(self) -> &'static str {
        match self {
            Arm::Stock => "stock",
            Arm::Candidate => "candidate",
        }
    }
}

/// One raw timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewSample {
    /// `inference`, `training`, or a shape workload name.
    pub workload: String,
    pub pair: u32,
    pub arm: Arm,
    pub seconds: f64,
    /// Any other fields the worker reported for this sample (e.g. `prefill_s`, `decode_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

pub type Sample = NewSample;

/// A completed evaluation of one candidate, with all its samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMeasurement {
    pub candidate_id: CandidateId,
    /// Passed the correctness gate.
    pub correct: bool,
    /// Combined score: median of per-pair stock/candidate ratios (> 1 is faster), and its 95 % interval.
    /// `None` when nothing was timed (e.g. the gate failed first).
    pub ratio: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    /// The worker's gate object (errors, tolerance, tokens compared, reason).
    pub gate: Value,
    /// The rest of the worker's result (per-workload ratios, tok/s, peak memory, call counts), samples removed.
    pub detail: Value,
    pub samples: Vec<NewSample>,
}

impl NewMeasurement {
    /// Builds a measurement from the result of the worker's `evaluate` op (docs/worker-protocol.md):
    /// takes `correct`, `gate`, `combined.{ratio,lo,hi}`, and every sample of `inference.samples` and
    /// `training.samples` (fields other than `pair`, `arm`, `seconds` go to `extra`).
    pub fn from_worker_result(candidate_id: CandidateId, result: &Value) -> Result<NewMeasurement> {
        let invalid = |message: String| StoreError::Invalid { field: "evaluate result", message };
        let correct = result.get("correct").and_then(Value::as_bool).ok_or_else(|| invalid("missing boolean `correct`".into()))?;
        let combined = result.get("combined").filter(|v| !v.is_null());
        let num = |k: &str| combined.and_then(|c| c.get(k)).and_then(Value::as_f64);
        let mut detail = result.clone();
        let mut samples = Vec::new();
        for workload in ["inference", "training"] {
            let Some(list) = detail.get_mut(workload).and_then(|w| w.as_object_mut()).and_then(|w| w.remove("samples")) else {
                continue;
            };
            let list = list.as_array().cloned().ok_or_else(|| invalid(format!("{workload}.samples is not a list")))?;
            for (i, s) in list.into_iter().enumerate() {
                let mut obj = s.as_object().cloned().ok_or_else(|| invalid(format!("{workload}.samples[{i}] is not an object")))?;
                let pair =
                    obj.remove("pair").and_then(|v| v.as_u64()).ok_or_else(|| invalid(format!("{workload}.samples[{i}].pair missing")))?;
                let arm = match obj.remove("arm").as_ref().and_then(Value::as_str) {
                    Some("stock") => Arm::Stock,
                    Some("candidate") => Arm::Candidate,
                    other => return Err(invalid(format!("{workload}.samples[{i}].arm is {other:?}"))),
                };
                let seconds = obj
                    .remove("seconds")
                    .and_then(|v| v.as_f64())
                    .ok_or_else(|| invalid(format!("{workload}.samples[{i}].seconds missing")))?;
                samples.push(NewSample {
                    workload: workload.to_string(),
                    pair: pair as u32,
                    arm,
                    seconds,
                    extra: (!obj.is_empty()).then_some(Value::Object(obj)),
                });
            }
        }
        let gate = detail.as_object_mut().and_then(|o| o.remove("gate")).unwrap_or(Value::Null);
        Ok(NewMeasurement { candidate_id, correct, ratio: num("ratio"), lo: num("lo"), hi: num("hi"), gate, detail, samples })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub id: i64,
    pub candidate_id: CandidateId,
    pub session_id: SessionId,
    pub at: String,
    pub correct: bool,
    pub ratio: Option<f64>,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub gate: Value,
    pub detail: Value,
}

fn measurement_from_row(r: &Row<'_>) -> rusqlite::Result<Measurement> {
    Ok(Measurement {
        id: r.get("id")?,
        candidate_id: r.get("candidate_id")?,
        session_id: r.get("session_id")?,
        at: r.get("at")?,
        correct: r.get("correct")?,
        ratio: r.get("ratio")?,
        lo: r.get("lo")?,
        hi: r.get("hi")?,
        gate: json_col(r, "gate_json")?,
        detail: json_col(r, "detail_json")?,
    })
}

impl Store {
    /// Records one completed evaluation in ONE transaction: the summary row, every sample, the
    /// candidate's status (`measured`) and its session's `evaluations` counter. Either all of it is
    /// stored or none (a crash mid-way leaves the candidate as it was).
    pub fn record_measurement(&self, m: &NewMeasurement) -> Result<i64> {
        let tx = self.conn.unchecked_transaction()?;
        let at = now();
        let session_id: SessionId = tx
            .query_row("SELECT session_id FROM candidates WHERE id = ?1", [m.candidate_id], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound { what: "candidate", id: m.candidate_id.to_string() })?;
        tx.execute(
            "INSERT INTO measurements (candidate_id, session_id, at, correct, ratio, lo, hi, gate_json, detail_json)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![m.candidate_id, session_id, at, m.correct, m.ratio, m.lo, m.hi, to_json(&m.gate)?, to_json(&m.detail)?],
        )?;
        let id = tx.last_insert_rowid();
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO samples (measurement_id, workload, pair, arm, seconds, extra_json) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for s in &m.samples {
                let extra = s.extra.as_ref().map(to_json).transpose()?;
                st.execute(params![id, s.workload, s.pair, s.arm.as_str(), s.seconds, extra])?;
            }
        }
        tx.execute("UPDATE candidates SET status = 'measured', updated_at = ?2 WHERE id = ?1", params![m.candidate_id, at])?;
        tx.execute("UPDATE sessions SET evaluations = evaluations + 1, updated_at = ?2 WHERE id = ?1", params![session_id, at])?;
        tx.commit()?;
        Ok(id)
    }

    /// Every evaluation of a candidate, oldest first.
    pub fn measurements(&self, candidate_id: CandidateId) -> Result<Vec<Measurement>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM measurements WHERE candidate_id = ?1 ORDER BY id")?;
        let rows = st.query_map([candidate_id], measurement_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Every evaluation of a session, oldest first.
    pub fn session_measurements(&self, session_id: SessionId) -> Result<Vec<Measurement>> {
        let mut st = self.conn.prepare_cached("SELECT * FROM measurements WHERE session_id = ?1 ORDER BY id")?;
        let rows = st.query_map([session_id], measurement_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The raw samples of one measurement, by workload, pair, arm.
    pub fn samples(&self, measurement_id: i64) -> Result<Vec<Sample>> {
        let mut st = self.conn.prepare_cached(
            "SELECT workload, pair, arm, seconds, extra_json FROM samples WHERE measurement_id = ?1 ORDER BY workload, pair, arm DESC",
        )?;
        let rows = st.query_map([measurement_id], |r| {
            let arm: String = r.get("arm")?;
            let extra: Option<String> = r.get("extra_json")?;
            Ok(NewSample {
                workload: r.get("workload")?,
                pair: r.get("pair")?,
                arm: if arm == "stock" { Arm::Stock } else { Arm::Candidate },
                seconds: r.get("seconds")?,
                extra: extra
                    .map(|t| serde_json::from_str(&t))
                    .transpose()
                    .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
