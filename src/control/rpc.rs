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
}

impl Handler for super::Control {
    fn call(&self, method: &str, params: Value) -> Result<Value, ControlError> {
        super::Control::call(self, method, params)
    }
}

/// One line of outcome for the log: method, account, result code. Never parameters
/// beyond the account, never results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub method: String,
    pub account: Option<String>,
    pub code: String,
    /// The control socket's peer, when known.
    pub caller: Option<crate::kms::Caller>,
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
pub fn control_error(e: &ControlError) -> Value {
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
            log(LogLine {
                method,
                account: None,
                code: e.code().to_owned(),
                caller: crate::kms::audit::caller(),
            });
            return id.map(|_| response_err(reply_id, control_error(&e)));
        }
    };
    let account = params.get("AccountId").and_then(Value::as_str).map(str::to_owned);
    let result = h.call(&method, params);
    log(LogLine {
        method,
        account,
        code: match &result {
            Ok(_) => "ok".into(),
            Err(e) => e.code().to_owned(),
        },
        caller: crate::kms::audit::caller(),
    });
    let id = id?;
    Some(match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
        Err(e) => response_err(id, control_error(&e)),
    })
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
