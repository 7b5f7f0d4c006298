//! Reading diffusers / transformers `config.json` files: each model declares the file's fields as
//! a `#[derive(Deserialize)]` struct (absent and `null` keys are `None`, as diffusers fills them
//! with its class defaults), reads it with [`parse`] and checks it in a `validate` step that turns
//! it into the config the model is built from. The field types here carry the checks every
//! config needs: sizes are bounded ([`Size`]), per-block values are an int or a list
//! ([`PerBlock`]), and numbers that must not be `null` say so ([`Number`]).

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::{Error, Result};

/// The largest integer a model config may hold (layer, channel, head and token counts, vocabulary
/// sizes). Real models stay far below it; a corrupted or hostile config that declares more is
/// refused before anything is sized from it (10^12 layers once aborted the process on a failed
/// allocation).
pub const MAX_CONFIG_INT: u64 = 1 << 20;

/// Deserialize `value` into the file struct `T`; an error names the config and the key path
/// (`block_out_channels[2]: invalid type: string "x", expected an integer`).
pub fn parse<T: DeserializeOwned>(what: &'static str, value: &Value) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            Error::config(what, inner.to_string())
        } else {
            Error::config(what, format!("`{path}`: {inner}"))
        }
    })
}

/// A count or a size: a non-negative integer no larger than [`MAX_CONFIG_INT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if v > MAX_CONFIG_INT {
            return Err(D::Error::custom(format!(
                "{v} is beyond any real model (at most {MAX_CONFIG_INT})"
            )));
        }
        Ok(Size(v as usize))
    }
}

/// `sizes(&[Size])` as plain numbers.
pub fn sizes(list: &[Size]) -> Vec<usize> {
    list.iter().map(|s| s.0).collect()
}

/// An optional size with its default.
pub fn size_or(v: Option<Size>, default: usize) -> usize {
    v.map_or(default, |s| s.0)
}

/// A value given once for every block or as one entry per block (diffusers'
/// `attention_head_dim`, `num_attention_heads`, `transformer_layers_per_block`, ...).
#[derive(Clone, Debug, PartialEq)]
pub enum PerBlock<T> {
    All(T),
    Each(Vec<T>),
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for PerBlock<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match Value::deserialize(d)? {
            list @ Value::Array(_) => Vec::<T>::deserialize(list)
                .map(PerBlock::Each)
                .map_err(D::Error::custom),
            one => T::deserialize(one)
                .map(PerBlock::All)
                .map_err(D::Error::custom),
        }
    }
}

impl<T: Clone> PerBlock<T> {
    /// One value per block; a list of the wrong length is an error naming `key`.
    pub fn expand(&self, what: &'static str, key: &str, blocks: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::All(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
            PerBlock::Each(list) => Err(Error::config(
                what,
                format!(
                    "`{key}` has {} entries, one per block ({blocks}) is needed",
                    list.len()
                ),
            )),
        }
    }
}

/// An optional per-block value expanded to `blocks` entries, or `default` for each.
pub fn per_block_or<T: Clone>(
    field: &Option<PerBlock<T>>,
    what: &'static str,
    key: &str,
    blocks: usize,
    default: T,
) -> Result<Vec<T>> {
    match field {
        Some(p) => p.expand(what, key, blocks),
        None => Ok(vec![default; blocks]),
    }
}

/// A number that, when present, must not be `null`: diffusers would compute with `None` (and
/// fail, or worse for `scaling_factor`), so an explicit `null` is an error, while an absent key
/// takes the class default. Declare the field `#[serde(default)] key: Number`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Number {
    #[default]
    Absent,
    Null,
    Given(f64),
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(match Option::<f64>::deserialize(d)? {
            None => Number::Null,
            Some(v) => Number::Given(v),
        })
    }
}

impl Number {
    /// The value, or `default` when absent; `null`, non-finite and out-of-range values are
    /// errors naming `key`.
    pub fn within(
        self,
        what: &'static str,
        key: &str,
        default: f64,
        range: std::ops::RangeInclusive<f64>,
    ) -> Result<f64> {
        let v = match self {
            Number::Absent => return Ok(default),
            Number::Null => {
                return Err(Error::config(
                    what,
                    format!("`{key}` is null (a number in {range:?} is needed)"),
                ))
            }
            Number::Given(v) => v,
        };
        if !v.is_finite() || !range.contains(&v) {
            return Err(Error::config(
                what,
                format!("`{key}` = {v} is outside {range:?}"),
            ));
        }
        Ok(v)
    }
}

/// A string setting we support only one value of (`act_fn: "silu"`, ...): absent or equal to
/// `only` passes, anything else is an unsupported-config error naming the key and the value.
pub fn require_str(what: &str, key: &str, value: &Option<String>, only: &str) -> Result<()> {
    match value.as_deref() {
        None => Ok(()),
        Some(v) if v == only => Ok(()),
        Some(v) => Err(Error::Unsupported(format!(
            "{what} {key} `{v}` (only `{only}`)"
        ))),
    }
}

/// Parses a config file as Python's `json` writes it: diffusers saves a float default of
/// `-inf` (DPMSolverMultistepScheduler's `lambda_min_clipped`) as the bare token `-Infinity`,
/// which strict JSON rejects. Bare `NaN`, `Infinity` and `-Infinity` outside strings read as
/// `null`, i.e. the class default, which is what such a key holds in every config we know.
pub fn parse_python_json(text: &str) -> serde_json::Result<Value> {
    match serde_json::from_str(text) {
        Ok(v) => Ok(v),
        Err(strict) => {
            let relaxed = nulls_for_python_floats(text);
            serde_json::from_str(&relaxed).map_err(|_| strict)
        }
    }
}

fn nulls_for_python_floats(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}
