//! Running external commands (the probe's `sysctl`, `ioreg`, `nvidia-smi`; the scheduler's `ioreg`,
//! `pmset`, `loginctl`) without ever hanging the caller: every command has a time limit, and a
//! missing program, a non-zero exit or a timeout is "no answer" ([`run_stdout`]) or an error that
//! says which ([`run`]).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a probe command may take. `nvidia-smi` can stall for seconds while a driver
/// initializes; beyond this the field is reported unknown rather than delaying the daemon.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Stdout of `program args…` if it ran to a zero exit within `timeout`; `None` otherwise.
pub fn run_stdout(program: &str, args: &[&str], timeout: Duration) -> Option<String> {
    run(program, args, timeout).ok()
}

/// Stdout of `program args…` if it ran to a zero exit within `timeout`; otherwise why not (the
/// program could not start, it timed out and was killed, or it exited non-zero: status and stderr).
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    // Read on threads so a chatty command cannot block on a full pipe while we wait for it.
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            pipe.read_to_end(&mut buf).map(|_| buf)
        })
    };
    let stdout = read(Box::new(child.stdout.take().ok_or("no stdout")?));
    let stderr = read(Box::new(child.stderr.take().ok_or("no stderr")?));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s; killed", timeout.as_secs_f64()));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e.to_string());
            }
        }
    };
    let out = stdout.join().map_err(|_| "reading stdout failed")?.map_err(|e| e.to_string())?;
    if !status.success() {
        let err = stderr.join().ok().and_then(Result::ok).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&err).trim()));
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_stdout_of_a_successful_command() {
        let out = run_stdout("sh", &["-c", "echo hello"], COMMAND_TIMEOUT);
        assert_eq!(out.as_deref(), Some("hello\n"));
    }

    #[test]
    fn missing_program_failure_and_timeout_are_none() {
        assert_eq!(run_stdout("tilewise-no-such-program", &[], COMMAND_TIMEOUT), None);
        assert_eq!(run_stdout("sh", &["-c", "echo x; exit 3"], COMMAND_TIMEOUT), None);
        let start = Instant::now();
        assert_eq!(run_stdout("sleep", &["5"], Duration::from_millis(200)), None);
        assert!(start.elapsed() < Duration::from_secs(3));
    }
}
