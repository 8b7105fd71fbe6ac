//! A deliberately plain client of the daemon's wire format (docs/protocol.md): a blocking Unix
//! socket, one JSON line out, one line back.
//!
//! Why not the crate's own client type: the suite must be able to send what no well-behaved
//! client would (half frames, junk, one byte at a time) and to see exactly what comes back on the
//! wire, so it owns the bytes end to end. The JSON-RPC vocabulary (method names, error codes) still
//! comes from `tilewise::ipc::protocol`, the one definition.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub use tilewise::ipc::protocol::{codes, methods, MAX_REQUEST_LINE, PROTOCOL_VERSION};

/// The answer to one call: the `result`, or the JSON-RPC `error` object the daemon sent.
pub type Reply = std::result::Result<Value, Value>;

pub struct Client {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    next_id: u64,
}

/// What became of a connection after something was sent on it.
#[derive(Debug, Clone, PartialEq)]
pub enum Wire {
    /// A line came back (without its `\n`).
    Line(String),
    /// The daemon closed the connection.
    Closed,
    /// Nothing within the timeout.
    Silent,
}

impl Client {
    /// Connects with a read/write timeout on every later operation.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Client> {
        let stream = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        Ok(Client { writer: stream, reader, next_id: 1 })
    }

    /// Connects and completes the `hello` handshake.
    pub fn connect_hello(socket: &Path, timeout: Duration, who: &str) -> Result<Client> {
        let mut c = Client::connect(socket, timeout)?;
        c.call(methods::HELLO, json!({"client": who, "protocol": PROTOCOL_VERSION}))?.map_err(|e| anyhow!("hello refused: {e}"))?;
        Ok(c)
    }

    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        self.writer.set_read_timeout(Some(timeout))?;
        self.writer.set_write_timeout(Some(timeout))?;
        Ok(())
    }

    /// One request, one reply; checks that the reply answers this request (same id, JSON-RPC 2.0,
    /// exactly one of result/error). Event notifications in between are skipped.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Reply> {
        let id = self.next_id;
        self.next_id += 1;
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        self.send_raw(format!("{line}\n").as_bytes())?;
        loop {
            let text = match self.read_line()? {
                Wire::Line(t) => t,
                Wire::Closed => bail!("connection closed while waiting for the reply to {method}"),
                Wire::Silent => bail!("no reply to {method} within the timeout"),
            };
            let v: Value = serde_json::from_str(&text).with_context(|| format!("reply is not JSON: {text:.200}"))?;
            if v.get("method").is_some() && v.get("id").is_none() {
                continue; // a notification
            }
            if v.get("jsonrpc") != Some(&json!("2.0")) {
                bail!("reply lacks jsonrpc 2.0: {text:.200}");
            }
            if v.get("id") != Some(&json!(id)) {
                bail!("reply id {:?} does not match request id {id}", v.get("id"));
            }
            return match (v.get("result"), v.get("error")) {
                (Some(r), None) => Ok(Ok(r.clone())),
                (None, Some(e)) => Ok(Err(e.clone())),
                _ => bail!("reply has not exactly one of result/error: {text:.200}"),
            };
        }
    }

    /// Writes bytes as they are (no framing added).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer.write_all(bytes)?;
        Ok(())
    }

    /// Reads one line, telling a closed connection from a silent one.
    pub fn read_line(&mut self) -> Result<Wire> {
        let mut buf = Vec::new();
        match self.reader.read_until(b'\n', &mut buf) {
            Ok(0) => Ok(Wire::Closed),
            Ok(_) if buf.ends_with(b"\n") => {
                buf.pop();
                Ok(Wire::Line(String::from_utf8_lossy(&buf).into_owned()))
            }
            Ok(_) => Ok(Wire::Closed), // a partial line then EOF
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(Wire::Silent),
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => Ok(Wire::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads and discards whatever the daemon sends until it goes quiet or closes; says whether it closed.
    pub fn drain(&mut self) -> bool {
        let mut sink = [0u8; 8192];
        loop {
            match self.reader.read(&mut sink) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
                Err(_) => return true,
            }
        }
    }

    /// Closes the write half (a client that stops mid-frame and hangs up).
    pub fn shutdown_write(&self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Write);
    }
}

/// The `code` of a JSON-RPC error object (0 when absent).
pub fn error_code(e: &Value) -> i64 {
    e.get("code").and_then(Value::as_i64).unwrap_or(0)
}

/// `policy.get` params for a model this machine has never tuned (the daemon must answer native).
pub fn unknown_model_params(tag: &str) -> Value {
    json!({"model": format!("reliability-{tag}"), "mlx": "0.32.4", "backend": "cpu"})
}

/// Checks a `policy.get` result has the contract's shape (docs/protocol.md).
pub fn check_policy_result(r: &Value) -> Result<()> {
    let ok = r.get("policy").map(Value::is_object).unwrap_or(false)
        && r.get("hash").and_then(Value::as_str).map(|h| h.starts_with("sha256:")).unwrap_or(false)
        && matches!(r.get("source").and_then(Value::as_str), Some("best" | "native"))
        && r.get("reason").and_then(Value::as_str).is_some();
    if ok {
        Ok(())
    } else {
        bail!("policy.get result lacks policy/hash/source/reason: {:.300}", r.to_string())
    }
}
