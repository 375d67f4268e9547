//! STUB — replaced by the config helper.
pub(super) struct RawConfig;
pub(super) struct ParseError {
    pub(super) location: Option<(usize, usize)>,
    pub(super) message: String,
}
pub(super) fn parse(_text: &str) -> Result<RawConfig, ParseError> {
    Err(ParseError {
        location: None,
        message: "stub".into(),
    })
}
