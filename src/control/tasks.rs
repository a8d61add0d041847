//! Background tasks: operations that move a whole disk's data (CreateEncryptedCopy,
//! ExportImage) run on a thread of their own and the call returns a `TaskId` at once.
//! `DescribeTasks` shows each task's state, bytes done and total, and rate;
//! `CancelTask` asks one to stop (it removes whatever it had made); shutdown cancels
//! every task and waits a bounded time. A task never holds the control plane's
//! operation lock or the catalog writer while it moves data.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Control, ControlError, Params};

/// Finished tasks kept for DescribeTasks (the oldest go first).
const KEEP_FINISHED: usize = 1000;

/// Where a task is.
#[derive(Debug, Clone)]
enum State {
    Running,
    Finished(Value),
    Failed { code: String, message: String },
    Cancelled,
}

/// One background task.
pub(super) struct Task {
    pub id: String,
    account: String,
    action: &'static str,
    resource: String,
    created_at: String,
    started: Instant,
    done: AtomicU64,
    total: AtomicU64,
    cancel: AtomicBool,
    state: Mutex<(State, Option<(String, Instant)>)>,
}

impl Task {
    /// Whether the task was asked to stop; long loops check it between batches.
    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// `bytes` more are done.
    pub(super) fn progress(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The error a cancelled task returns.
    pub(super) fn cancelled_error(&self) -> ControlError {
        ControlError::state(
            "OperationCancelled",
            format!("task {} was cancelled; nothing it made is left behind", self.id),
        )
    }

    fn running(&self) -> bool {
        matches!(self.state.lock().expect("task state").0, State::Running)
    }

    fn view(&self) -> Value {
        let (state, finished) = self.state.lock().expect("task state").clone();
        let done = self.done.load(Ordering::Relaxed);
        let end = finished.as_ref().map(|f| f.1).unwrap_or_else(Instant::now);
        let secs = end.duration_since(self.started).as_secs_f64().max(1e-3);
        let mut v = json!({
            "TaskId": self.id,
            "TaskAction": self.action,
            "ResourceId": self.resource,
            "CreationTime": self.created_at,
            "FinishedTime": finished.as_ref().map(|f| f.0.clone()),
            "BytesDone": done,
            "BytesTotal": self.total.load(Ordering::Relaxed),
            "RateBytesPerSec": (done as f64 / secs) as u64,
        });
        let (status, extra) = match state {
            State::Running => ("Processing", None),
            State::Finished(r) => ("Finished", Some(("Result", r))),
            State::Failed { code, message } => ("Failed", Some(("Error", json!({"Code": code, "Message": message})))),
            State::Cancelled => ("Cancelled", None),
        };
        v["TaskStatus"] = status.into();
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        v
    }
}

/// Every task of this daemon's life (finished ones up to [`KEEP_FINISHED`]).
#[derive(Default)]
pub(super) struct Tasks {
    map: Mutex<BTreeMap<String, Arc<Task>>>,
}

impl Tasks {
    /// Starts `body` on a thread of its own as task `action` on `resource`, `total`
    /// bytes to move.
    pub(super) fn spawn(
        &self,
        account: &str,
        action: &'static str,
        resource: &str,
        total: u64,
        body: impl FnOnce(&Task) -> Result<Value, ControlError> + Send + 'static,
    ) -> Result<Arc<Task>, ControlError> {
        let t = Arc::new(Task {
            id: super::util::new_id("t"),
            account: account.to_owned(),
            action,
            resource: resource.to_owned(),
            created_at: super::util::now_rfc3339(),
            started: Instant::now(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(total),
            cancel: AtomicBool::new(false),
            state: Mutex::new((State::Running, None)),
        });
        {
            let mut m = self.map.lock().expect("tasks");
            let mut finished: Vec<(Instant, String)> = m
                .values()
                .filter(|t| !t.running())
                .map(|t| (t.started, t.id.clone()))
                .collect();
            finished.sort();
            for (_, k) in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
                m.remove(k);
            }
            m.insert(t.id.clone(), t.clone());
        }
        let task = t.clone();
        // The task's KMS calls are audited as its caller's.
        let caller = crate::kms::audit::caller();
        std::thread::Builder::new()
            .name(format!("task-{}", t.id))
            .spawn(move || {
                // A panic fails the task (it must not stay Processing forever).
                let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crate::kms::audit::with_caller(caller, || body(&task))
                }))
                .unwrap_or_else(|_| {
                    Err(ControlError::DataPath(
                        "the task stopped on an internal error (a panic; see the daemon's log)".into(),
                    ))
                });
                let state = match res {
                    Ok(v) => State::Finished(v),
                    Err(_) if task.cancelled() => State::Cancelled,
                    Err(e) => State::Failed {
                        code: e.code().to_string(),
                        message: e.to_string(),
                    },
                };
                if let State::Failed { code, message } = &state {
                    tracing::warn!(task = %task.id, action = %task.action, code = %code, error = %message, "background task failed");
                }
                *task.state.lock().expect("task state") = (state, Some((super::util::now_rfc3339(), Instant::now())));
            })
            .map_err(|e| ControlError::DataPath(format!("starting a task thread: {e}")))?;
        Ok(t)
    }

    /// Asks every running task to stop and waits up to `timeout` for them; returns how
    /// many are still running.
    pub(super) fn cancel_all(&self, timeout: Duration) -> usize {
        let all: Vec<Arc<Task>> = self.map.lock().expect("tasks").values().cloned().collect();
        for t in &all {
            t.cancel.store(true, Ordering::SeqCst);
        }
        let start = Instant::now();
        loop {
            let left = all.iter().filter(|t| t.running()).count();
            if left == 0 || start.elapsed() > timeout {
                return left;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The running task `action` on `resource`, if there is one.
    pub(super) fn running(&self, action: &str, resource: &str) -> Option<Arc<Task>> {
        self.map
            .lock()
            .expect("tasks")
            .values()
            .find(|t| t.action == action && t.resource == resource && t.running())
            .cloned()
    }

    fn get(&self, id: &str, account: &str) -> Result<Arc<Task>, ControlError> {
        self.map
            .lock()
            .expect("tasks")
            .get(id)
            .filter(|t| t.account == account)
            .cloned()
            .ok_or_else(|| ControlError::NotFound {
                code: "InvalidTaskId.NotFound",
                id: id.to_owned(),
            })
    }
}

impl Control {
    pub(super) fn describe_tasks(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let ids = p.opt_str_list("TaskIds")?;
        let status = p.opt_str("TaskStatus")?;
        let action = p.opt_str("TaskAction")?;
        p.finish()?;
        let out: Vec<Value> = self
            .tasks
            .map
            .lock()
            .expect("tasks")
            .values()
            .filter(|t| t.account == account && ids.as_ref().is_none_or(|l| l.contains(&t.id)))
            .map(|t| t.view())
            .filter(|v| status.as_ref().is_none_or(|s| v["TaskStatus"] == s.as_str()))
            .filter(|v| action.as_ref().is_none_or(|a| v["TaskAction"] == a.as_str()))
            .collect();
        Ok(json!({ "TotalCount": out.len(), "TaskSet": { "Task": out } }))
    }

    pub(super) fn cancel_task(&self, mut p: Params) -> Result<Value, ControlError> {
        let account = p.account()?;
        let _region = p.opt_str("RegionId")?;
        let id = p.str("TaskId")?;
        p.finish()?;
        let t = self.tasks.get(&id, &account)?;
        if !t.running() {
            return Err(ControlError::state(
                "IncorrectTaskStatus",
                format!("task {id} is no longer running; nothing to cancel"),
            ));
        }
        t.cancel.store(true, Ordering::SeqCst);
        Ok(json!({ "TaskId": id, "CancelRequested": true }))
    }

    /// Cancels every task and waits up to `timeout` (shutdown); returns how many are
    /// still running.
    pub fn cancel_tasks(&self, timeout: Duration) -> usize {
        self.tasks.cancel_all(timeout)
    }
}
