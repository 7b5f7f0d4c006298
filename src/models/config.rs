//! Reading diffusers / transformers `config.json` values with clear errors (the configs are
//! `serde_json::Value`s, read or inferred by `src/weights/`).

use serde_json::Value;

use crate::{Error, Result};

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
        Error::Weights(format!(
            "{} config: `{key}` should be {expected}, found {:?}",
            self.what,
            self.field(key)
        ))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.field(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.bad(key, "an integer"))
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
        arr.iter()
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| self.bad(key, "a list of integers"))
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
            Some(Value::Number(n)) => Ok(Some(vec![
                n.as_u64().ok_or_else(|| self.bad(key, "an integer"))?
                    as usize;
                blocks
            ])),
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
