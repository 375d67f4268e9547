//! STUB — replaced by the config helper.
use super::{Config, Problem, Source, raw::RawConfig};
pub(super) fn validate(_raw: RawConfig, _source: &Source) -> Result<Config, Vec<Problem>> {
    Err(vec![])
}
