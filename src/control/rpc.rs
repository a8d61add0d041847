//! JSON-RPC 2.0 framing: one request (or batch) per line in, one response per line out.
//!
//! Errors are JSON-RPC error objects: `code` is the JSON-RPC number (-32700 parse error,
//! -32600 invalid request, -32601 unknown method, -32602 invalid params, -32000 operation
//! refused or failed), `message` says what to do, and `data.code` is the stable
//! ECS-style string (plus `data.retry_after_ms` when throttled). This module holds no
//! state and never sees key material; it is what the fuzz target drives.

use serde_json::{json, Map, Value};

use super::error::{rpc_code, ControlError};

/// Something that runs methods (the [`super::Control`], or a test double).
pub trait Handler {
    fn call(&self, method: &str, params: Value) -> Result<Value, ControlError>;
    /// [`Handler::call`] as request `request_id` (the id the log line and the
    /// reply's `RequestId` carry).
    fn call_with_id(&self, method: &str, params: Value, request_id: &str) -> Result<Value, ControlError> {
        let _ = request_id;
        self.call(method, params)
    }
}

impl Handler for super::Control {
    fn call(&self, method: &str, params: Value) -> Result<Value, ControlError> {
        super::Control::call(self, method, params)
    }
    fn call_with_id(&self, method: &str, params: Value, request_id: &str) -> Result<Value, ControlError> {
        super::Control::call_with_id(self, method, params, request_id)
    }
}

/// One line of outcome for the log: method, account, request id, result code,
/// duration and the error message. Never parameters beyond the account, never
/// results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub method: String,
    pub account: Option<String>,
    pub code: String,
    /// The control socket's peer, when known.
    pub caller: Option<crate::kms::Caller>,
    /// The request's id (`RequestId` of the reply; `data.request_id` of an error).
    pub request_id: String,
    /// Time from parsing the request to its result.
    pub duration: std::time::Duration,
    /// The error message, on failure.
    pub error: Option<String>,
}

/// Writes `l` to the daemon's log: one line per RPC, `info` when it succeeded,
/// `warn` when it failed (with the error message).
pub(crate) fn log_line(l: &LogLine) {
    let caller = crate::logging::caller_field(l.caller);
    // The method is the client's string: at most 64 characters of it (a known
    // method is shorter).
    let method: String = l.method.chars().take(64).collect();
    let account: Option<String> = l.account.as_ref().map(|a| a.chars().take(64).collect());
    let duration_us = l.duration.as_micros() as u64;
    match &l.error {
        None => tracing::info!(
            method = %method,
            account = account.as_deref(),
            request_id = %l.request_id,
            caller = %caller,
            code = %l.code,
            duration_us,
            "rpc"
        ),
        Some(e) => tracing::warn!(
            method = %method,
            account = account.as_deref(),
            request_id = %l.request_id,
            caller = %caller,
            code = %l.code,
            duration_us,
            error = %e,
            "rpc failed"
        ),
    }
}

fn error_obj(rpc: i64, message: &str, code: &str, retry_after_ms: Option<u64>) -> Value {
    let mut data = Map::new();
    data.insert("code".into(), json!(code));
    if let Some(ms) = retry_after_ms {
        data.insert("retry_after_ms".into(), json!(ms));
    }
    json!({ "code": rpc, "message": message, "data": data })
}

fn response_err(id: Value, err: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": err })
}

/// The error object of a [`ControlError`].
pub(crate) fn control_error(e: &ControlError) -> Value {
    error_obj(e.rpc_code(), &e.to_string(), e.code(), e.retry_after_ms())
}

fn invalid_request(why: &str) -> Value {
    error_obj(
        rpc_code::INVALID_REQUEST,
        &format!("invalid JSON-RPC 2.0 request: {why}; send {{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"DescribeDisks\",\"params\":{{...}}}}"),
        "Rpc.InvalidRequest",
        None,
    )
}

/// Handles one request object; `None` for a notification.
fn handle_one(h: &dyn Handler, req: Value, log: &mut dyn FnMut(LogLine)) -> Option<Value> {
    let started = std::time::Instant::now();
    let Value::Object(mut m) = req else {
        return Some(response_err(
            Value::Null,
            invalid_request("a request must be a JSON object"),
        ));
    };
    let id = match m.remove("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v),
        Some(_) => {
            return Some(response_err(
                Value::Null,
                invalid_request("id must be a string, a number or null"),
            ))
        }
    };
    let reply_id = id.clone().unwrap_or(Value::Null);
    if m.get("jsonrpc") != Some(&json!("2.0")) {
        return Some(response_err(reply_id, invalid_request("\"jsonrpc\" must be \"2.0\"")));
    }
    let method = match m.remove("method") {
        Some(Value::String(s)) => s,
        _ => return Some(response_err(reply_id, invalid_request("\"method\" must be a string"))),
    };
    let params = match m.remove("params") {
        None | Some(Value::Null) => Value::Null,
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            let e = ControlError::param(
                "InvalidParameter.Params",
                "params must be an object of named ECS parameters (by-position arrays are not supported)",
            );
            let request_id = super::util::new_id("req");
            log(LogLine {
                method,
                account: None,
                code: e.code().to_owned(),
                caller: crate::kms::audit::caller(),
                request_id: request_id.clone(),
                duration: started.elapsed(),
                error: Some(e.to_string()),
            });
            return id.map(|_| response_err(reply_id, with_request_id(control_error(&e), &request_id)));
        }
    };
    let account = params.get("AccountId").and_then(Value::as_str).map(str::to_owned);
    let request_id = super::util::new_id("req");
    let caller = crate::kms::audit::caller();
    // Every line logged while the method runs carries the request's id.
    let span = tracing::info_span!(
        "rpc",
        method = %method.chars().take(64).collect::<String>(),
        request_id = %request_id,
        account = account.as_ref().map(|a| a.chars().take(64).collect::<String>()),
        caller = %crate::logging::caller_field(caller),
    );
    let result = span.in_scope(|| h.call_with_id(&method, params, &request_id));
    log(LogLine {
        method,
        account,
        code: match &result {
            Ok(_) => "ok".into(),
            Err(e) => e.code().to_owned(),
        },
        caller,
        request_id: request_id.clone(),
        duration: started.elapsed(),
        error: result.as_ref().err().map(ToString::to_string),
    });
    let id = id?;
    Some(match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
        Err(e) => response_err(id, with_request_id(control_error(&e), &request_id)),
    })
}

/// An error object with the request's id in `data.request_id` (to find its log line).
fn with_request_id(mut err: Value, request_id: &str) -> Value {
    if let Some(d) = err.get_mut("data").and_then(Value::as_object_mut) {
        d.insert("request_id".into(), json!(request_id));
    }
    err
}

/// Handles one line of input (a request or a batch); returns the line to send back
/// (without the newline), or `None` when nothing is to be sent (notifications).
pub fn handle_line(h: &dyn Handler, line: &[u8], log: &mut dyn FnMut(LogLine)) -> Option<String> {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            let err = error_obj(
                rpc_code::PARSE_ERROR,
                &format!("request is not valid JSON ({e}); send one JSON-RPC request per line"),
                "Rpc.ParseError",
                None,
            );
            return Some(response_err(Value::Null, err).to_string());
        }
    };
    let out = match v {
        Value::Array(reqs) => {
            if reqs.is_empty() {
                Some(response_err(Value::Null, invalid_request("empty batch")))
            } else {
                let replies: Vec<Value> = reqs.into_iter().filter_map(|r| handle_one(h, r, log)).collect();
                (!replies.is_empty()).then_some(Value::Array(replies))
            }
        }
        other => handle_one(h, other, log),
    };
    out.map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes the request id it was given; `Fail` fails.
    struct Echo;
    impl Handler for Echo {
        fn call(&self, _: &str, _: Value) -> Result<Value, ControlError> {
            unreachable!("handle_line calls call_with_id")
        }
        fn call_with_id(&self, method: &str, _: Value, request_id: &str) -> Result<Value, ControlError> {
            if method == "Fail" {
                return Err(ControlError::param("InvalidParameter.Test", "it failed as asked"));
            }
            Ok(json!({ "RequestId": request_id }))
        }
    }

    fn one(line: &str) -> (Value, Vec<LogLine>) {
        let mut lines = Vec::new();
        let out = handle_line(&Echo, line.as_bytes(), &mut |l| lines.push(l)).unwrap();
        (serde_json::from_str(&out).unwrap(), lines)
    }

    #[test]
    fn the_log_line_and_the_reply_share_the_request_id() {
        let (v, l) = one(r#"{"jsonrpc":"2.0","id":1,"method":"Ok","params":{"AccountId":"a1"}}"#);
        assert_eq!(l.len(), 1);
        let id = v["result"]["RequestId"].as_str().unwrap();
        assert!(id.starts_with("req-"), "{v}");
        assert_eq!(l[0].request_id, id);
        assert_eq!((l[0].method.as_str(), l[0].code.as_str()), ("Ok", "ok"));
        assert_eq!(l[0].account.as_deref(), Some("a1"));
        assert_eq!(l[0].error, None);
    }

    #[test]
    fn a_failed_call_logs_its_message_and_the_error_names_the_request() {
        let (v, l) = one(r#"{"jsonrpc":"2.0","id":2,"method":"Fail","params":{}}"#);
        assert_eq!(l[0].code, "InvalidParameter.Test");
        assert_eq!(l[0].error.as_deref(), Some(v["error"]["message"].as_str().unwrap()));
        assert!(l[0].error.as_deref().unwrap().contains("it failed as asked"));
        assert_eq!(v["error"]["data"]["request_id"], l[0].request_id.as_str());
        assert_eq!(v["error"]["data"]["code"], "InvalidParameter.Test");
        // Positional params: refused, logged, and named too.
        let (v, l) = one(r#"{"jsonrpc":"2.0","id":3,"method":"Ok","params":[1]}"#);
        assert_eq!(l[0].code, "InvalidParameter.Params");
        assert_eq!(v["error"]["data"]["request_id"], l[0].request_id.as_str());
    }
}
