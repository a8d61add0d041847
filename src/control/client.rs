//! A JSON-RPC client for the daemon's unix socket (used by the CLI and the tests).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// An error reply (or a transport failure, with `rpc_code` 0 and `code` `Rpc.Transport`).
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub rpc_code: i64,
    pub code: String,
    pub message: String,
    pub data: Value,
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

fn transport(msg: String) -> RpcError {
    RpcError {
        rpc_code: 0,
        code: "Rpc.Transport".into(),
        message: msg,
        data: Value::Null,
    }
}

pub struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, RpcError> {
        let s = UnixStream::connect(path).map_err(|e| {
            transport(format!(
                "cannot connect to {}: {e}; is `sealdisk serve` running with that data directory?",
                path.display()
            ))
        })?;
        s.set_read_timeout(Some(Duration::from_secs(600))).ok();
        let r = BufReader::new(s.try_clone().map_err(|e| transport(e.to_string()))?);
        Ok(Client { w: s, r, next_id: 1 })
    }

    /// Sends one raw line and reads one line back.
    pub fn raw(&mut self, line: &str) -> Result<String, RpcError> {
        let mut l = line.to_owned();
        if !l.ends_with('\n') {
            l.push('\n');
        }
        self.w.write_all(l.as_bytes()).map_err(|e| transport(e.to_string()))?;
        let mut out = String::new();
        let n = self.r.read_line(&mut out).map_err(|e| transport(e.to_string()))?;
        if n == 0 {
            return Err(transport("the daemon closed the connection".into()));
        }
        Ok(out.trim_end().to_owned())
    }

    /// Calls `method` with `params`; the `result`, or the error reply.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, RpcError> {
        let id = self.next_id;
        self.next_id += 1;
        let req = json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
        let line = self.raw(&req.to_string())?;
        let v: Value = serde_json::from_str(&line).map_err(|e| transport(format!("bad reply: {e}")))?;
        if let Some(e) = v.get("error") {
            return Err(RpcError {
                rpc_code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
                code: e
                    .pointer("/data/code")
                    .and_then(Value::as_str)
                    .unwrap_or("Rpc.Unknown")
                    .to_owned(),
                message: e.get("message").and_then(Value::as_str).unwrap_or("").to_owned(),
                data: e.get("data").cloned().unwrap_or(Value::Null),
            });
        }
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    }
}
