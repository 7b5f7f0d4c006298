//! Reading diffusers / transformers `config.json` values with clear errors (the configs are
//! `serde_json::Value`s, read or inferred by `src/weights/`).

use serde_json::Value;

use crate::{Error, Result};

/// The largest integer a model config may hold (layer, channel, head and token counts, vocabulary
/// sizes). Real models stay far below it; a corrupted or hostile config that declares more is
/// refused before anything is sized from it (10^12 layers once aborted the process on a failed
/// allocation).
pub const MAX_CONFIG_INT: u64 = 1 << 20;

pub struct Config<'a> {
    pub what: &'static str,
    pub value: &'a Value,
}

impl<'a> Config<'a> {
    pub fn new(what: &'static str, value: &'a Value) -> Self {
        Config { what, value }
    }

    fn field(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, expected: &str) -> Error {
        Error::config(
            self.what,
            format!("`{key}` should be {expected}, found {:?}", self.field(key)),
        )
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self
            .field(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.bad(key, "an integer"))?;
        self.bounded(key, v)
    }
    /// `v` if it is a plausible size (see [`MAX_CONFIG_INT`]).
    fn bounded(&self, key: &str, v: u64) -> Result<usize> {
        if v > MAX_CONFIG_INT {
            return Err(Error::config(
                self.what,
                format!("`{key}` = {v} is beyond any real model (at most {MAX_CONFIG_INT})",),
            ));
        }
        Ok(v as usize)
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.field(key).is_none() {
            return Ok(default);
        }
        self.usize(key)
    }
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number")),
        }
    }
    /// A number that must be finite and within `range` when present; an explicit `null` is an
    /// error (diffusers would divide by `None`), absence gives `default`.
    pub fn f64_in(
        &self,
        key: &str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<f64> {
        let v = match self.value.get(key) {
            None => return Ok(default),
            Some(Value::Null) => {
                return Err(Error::config(
                    self.what,
                    format!("`{key}` is null (a number in {range:?} is needed)",),
                ))
            }
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "a number"))?,
        };
        if !v.is_finite() || !range.contains(&v) {
            return Err(Error::config(
                self.what,
                format!("`{key}` = {v} is outside {range:?}",),
            ));
        }
        Ok(v)
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }
    pub fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.field(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, "a string")),
        }
    }
    pub fn is_set(&self, key: &str) -> bool {
        self.field(key).is_some()
    }
    pub fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let arr = self
            .field(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.bad(key, "a list of integers"))?;
        if arr.len() as u64 > MAX_CONFIG_INT {
            return Err(self.bad(key, "a list of plausible length"));
        }
        arr.iter()
            .map(|v| {
                let x = v
                    .as_u64()
                    .ok_or_else(|| self.bad(key, "a list of integers"))?;
                self.bounded(key, x)
            })
            .collect()
    }
    pub fn str_list(&self, key: &str) -> Result<Vec<String>> {
        let arr = self
            .field(key)
            .and_then(Value::as_array)
            .ok_or_else(|| self.bad(key, "a list of strings"))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "a list of strings"))
            })
            .collect()
    }
    /// An int applied to every block, or a per-block list (diffusers' `attention_head_dim`,
    /// `num_attention_heads`, `transformer_layers_per_block`, ...). None when absent.
    pub fn per_block(&self, key: &str, blocks: usize) -> Result<Option<Vec<usize>>> {
        match self.field(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let v = n.as_u64().ok_or_else(|| self.bad(key, "an integer"))?;
                Ok(Some(vec![self.bounded(key, v)?; blocks]))
            }
            Some(Value::Array(_)) => {
                let v = self.usize_list(key)?;
                if v.len() != blocks {
                    return Err(self.bad(key, &format!("one value per block ({blocks})")));
                }
                Ok(Some(v))
            }
            Some(_) => Err(self.bad(key, "an integer or a list")),
        }
    }
    pub fn per_block_bool(&self, key: &str, blocks: usize, default: bool) -> Result<Vec<bool>> {
        match self.field(key) {
            None => Ok(vec![default; blocks]),
            Some(Value::Bool(b)) => Ok(vec![*b; blocks]),
            Some(Value::Array(a)) if a.len() == blocks => a
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| self.bad(key, "booleans")))
                .collect(),
            Some(_) => Err(self.bad(key, "a boolean or a list of booleans")),
        }
    }
}
