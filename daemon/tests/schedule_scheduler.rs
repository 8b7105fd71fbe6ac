//! The scheduler task driven by the real file source (a JSON file watched with notify): idle
//! time, activity, battery, bad input and live gate changes, and that it does not busy-poll.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tilewise::schedule::activity::ActivityFile;
use tilewise::schedule::{Activity, ActivityError, ActivitySource, Decision, FileSource, Gate, Gates, Scheduler, SchedulerOptions};
use tokio::sync::{watch, Notify};

fn gates(idle_seconds: f64) -> Gates {
    Gates { idle_seconds, max_load_1m: None, ..Gates::default() }
}

fn options() -> SchedulerOptions {
    SchedulerOptions { active_poll: Duration::from_millis(250), idle_poll: Duration::from_secs(30), busy: None }
}

/// Waits until the published decision satisfies `pred`; returns how long it took.
async fn wait_for(rx: &mut watch::Receiver<Decision>, within: Duration, pred: impl Fn(&Decision) -> bool) -> Duration {
    let start = Instant::now();
    let reached = matches!(tokio::time::timeout(within, rx.wait_for(|d| pred(d))).await, Ok(Ok(_)));
    match reached {
        true => start.elapsed(),
        false => panic!("decision not reached within {within:?}; last: {:?}", *rx.borrow()),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn activity_file(doc: &ActivityFile) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("activity.json");
    doc.write_to(&path).unwrap();
    Fixture { _dir: dir, path }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_opens_the_gate_after_the_configured_time_without_any_file_change() {
    let f = activity_file(&ActivityFile { user_idle_s: 0.0, ..Default::default() });
    let (_gtx, grx) = watch::channel(gates(1.5));
    let h = Scheduler::spawn(Arc::new(FileSource::new(&f.path).unwrap()), grx, options());
    let mut rx = h.subscribe();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.blocked_by == vec![Gate::Idle]).await;
    assert!(rx.borrow().reasons[0].starts_with("user active 0 s ago (needs 1 s idle)"), "{:?}", rx.borrow());
    // The scheduler sleeps for the missing idle time and then finds the gate open.
    let took = wait_for(&mut rx, Duration::from_secs(4), |d| d.run).await;
    assert!(took >= Duration::from_millis(900), "opened too early: {took:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activity_closes_the_gate_within_a_second_and_idle_reopens_it() {
    let f = activity_file(&ActivityFile { user_idle_s: 600.0, ..Default::default() });
    let (_gtx, grx) = watch::channel(gates(300.0));
    let h = Scheduler::spawn(Arc::new(FileSource::new(&f.path).unwrap()), grx, options());
    let mut rx = h.subscribe();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.run).await;

    for round in 0..3 {
        let back = std::time::SystemTime::now();
        let written = Instant::now();
        ActivityFile { user_idle_s: 0.0, ..Default::default() }.write_to(&f.path).unwrap();
        wait_for(&mut rx, Duration::from_secs(1), |d| !d.run).await;
        let took = written.elapsed();
        assert!(took < Duration::from_secs(1), "paused {took:?} after the activity");
        let d = rx.borrow().clone();
        assert_eq!(d.blocked_by, vec![Gate::Idle], "round {round}");
        // The moment the person came back is reported, so samples after it can be discarded.
        let at = d.user_active_at.expect("reading present");
        let skew = at.duration_since(back).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(500), "user_active_at off by {skew:?}");
        eprintln!("round {round}: paused {took:?} after the activity");

        ActivityFile { user_idle_s: 900.0, ..Default::default() }.write_to(&f.path).unwrap();
        wait_for(&mut rx, Duration::from_secs(1), |d| d.run).await;
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_battery_nothing_runs_and_bad_input_blocks_with_the_reason() {
    let f = activity_file(&ActivityFile { on_ac_power: false, battery_percent: Some(40), ..Default::default() });
    let (_gtx, grx) = watch::channel(gates(60.0));
    let h = Scheduler::spawn(Arc::new(FileSource::new(&f.path).unwrap()), grx, options());
    let mut rx = h.subscribe();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.blocked_by == vec![Gate::AcPower]).await;
    assert_eq!(rx.borrow().reasons, vec!["on battery (40 %)".to_string()]);
    // It stays closed (no flapping) while on battery.
    assert!(tokio::time::timeout(Duration::from_millis(700), rx.changed()).await.is_err());

    std::fs::write(&f.path, b"{\"on_ac_power\": tru").unwrap();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.blocked_by == vec![Gate::Source]).await;
    let reason = rx.borrow().summary();
    assert!(reason.contains("activity.json") && reason.contains("EOF"), "{reason}");

    ActivityFile::default().write_to(&f.path).unwrap();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.run).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_changes_apply_at_once() {
    let f = activity_file(&ActivityFile { user_idle_s: 30.0, ..Default::default() });
    let (gtx, grx) = watch::channel(gates(300.0));
    let h = Scheduler::spawn(Arc::new(FileSource::new(&f.path).unwrap()), grx, options());
    let mut rx = h.subscribe();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.blocked_by == vec![Gate::Idle]).await;
    gtx.send(gates(10.0)).unwrap();
    wait_for(&mut rx, Duration::from_secs(1), |d| d.run).await;
    gtx.send(Gates { max_load_1m: Some(0.5), ..gates(10.0) }).unwrap();
    ActivityFile { user_idle_s: 30.0, load_1m: 3.0, ..Default::default() }.write_to(&f.path).unwrap();
    wait_for(&mut rx, Duration::from_secs(1), |d| d.blocked_by == vec![Gate::Load]).await;
    // High load keeps a new session from starting but does not pause a running one.
    assert!(rx.borrow().run && !rx.borrow().may_start, "{:?}", *rx.borrow());
    h.stop().await;
}

/// Counts samples of an inner source, to show the scheduler is not polling while blocked.
struct Counting<S> {
    inner: S,
    samples: Arc<AtomicUsize>,
}

impl<S: ActivitySource> ActivitySource for Counting<S> {
    fn sample(&self) -> Result<Activity, ActivityError> {
        self.samples.fetch_add(1, Ordering::SeqCst);
        self.inner.sample()
    }
    fn changes(&self) -> Option<Arc<Notify>> {
        self.inner.changes()
    }
    fn name(&self) -> &'static str {
        "counting"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_scheduler_sleeps_instead_of_polling() {
    // Blocked by the battery: nothing to wait for but a change, so it samples once per idle_poll.
    let f = activity_file(&ActivityFile { on_ac_power: false, ..Default::default() });
    let samples = Arc::new(AtomicUsize::new(0));
    let source = Counting { inner: FileSource::new(&f.path).unwrap(), samples: samples.clone() };
    let (_gtx, grx) = watch::channel(gates(0.0));
    let h = Scheduler::spawn(Arc::new(source), grx, options());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = samples.load(Ordering::SeqCst);
    assert!((1..=2).contains(&n), "sampled {n} times in 2 s while blocked");

    // Blocked by the idle gate with 1 s missing: it wakes about once, when the gate can open.
    let g = activity_file(&ActivityFile { user_idle_s: 0.0, ..Default::default() });
    let samples = Arc::new(AtomicUsize::new(0));
    let source = Counting { inner: FileSource::new(&g.path).unwrap(), samples: samples.clone() };
    let (_gtx2, grx2) = watch::channel(gates(1.0));
    let h2 = Scheduler::spawn(Arc::new(source), grx2, options());
    let mut rx = h2.subscribe();
    wait_for(&mut rx, Duration::from_secs(3), |d| d.run).await;
    let n = samples.load(Ordering::SeqCst);
    assert!(n <= 3, "sampled {n} times to wait out 1 s of idle time");
    h.stop().await;
    h2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_gate_with_nothing_to_tune_is_sampled_slowly() {
    let f = activity_file(&ActivityFile::default());
    let samples = Arc::new(AtomicUsize::new(0));
    let source = Counting { inner: FileSource::new(&f.path).unwrap(), samples: samples.clone() };
    let (_gtx, grx) = watch::channel(gates(60.0));
    let (busy_tx, busy_rx) = watch::channel(false);
    let h = Scheduler::spawn(Arc::new(source), grx, SchedulerOptions { busy: Some(busy_rx), ..options() });
    let mut rx = h.subscribe();
    wait_for(&mut rx, Duration::from_secs(2), |d| d.run).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_samples = samples.load(Ordering::SeqCst);
    assert!(idle_samples <= 2, "sampled {idle_samples} times in 2 s with nothing to tune");

    // A session starts measuring: fast sampling, so a returning person is seen within 1 s.
    busy_tx.send(true).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy_samples = samples.load(Ordering::SeqCst) - idle_samples;
    assert!((5..=12).contains(&busy_samples), "sampled {busy_samples} times in 2 s while measuring");
    h.stop().await;
}
