//! Rotation: a credential may list several secrets or certificates. The current one is
//! used; when the provider answers `invalid_client` (wrong, expired or deleted secret,
//! certificate not uploaded), the next ones are tried in turn and the first that works
//! becomes current. A warning names the refused entry by its index, never its value.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::TokenError;

#[derive(Debug)]
pub(crate) struct Rotation {
    current: AtomicUsize,
    len: usize,
}

impl Rotation {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            len: len.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Indices in the order to try them: the current one first, then the others.
    pub(crate) fn order(&self) -> Vec<usize> {
        let current = self.current.load(Ordering::Relaxed);
        (0..self.len).map(|i| (current + i) % self.len).collect()
    }

    /// Records that `index` worked; logs when that changes the current entry.
    pub(crate) fn settle(&self, credential: &str, field: &str, index: usize) {
        let previous = self.current.swap(index, Ordering::Relaxed);
        if previous != index {
            tracing::warn!(
                credential = %credential,
                using = %format!("{field}[{index}]"),
                refused = %format!("{field}[{previous}]"),
                "Rotated to the next credential entry."
            );
        }
    }
}

/// The provider refused the client's own authentication (RFC 6749 §5.2 `invalid_client`):
/// another secret or certificate may work.
pub(crate) fn is_invalid_client(error: &TokenError) -> bool {
    match error.cause() {
        TokenError::Provider(provider) => provider.error.as_deref() == Some("invalid_client"),
        _ => false,
    }
}

/// Runs `attempt` over the entries in rotation order until one is not refused with
/// `invalid_client`. Other errors end the walk at once and are returned. When every entry is
/// refused, the current entry's error is returned.
pub(crate) async fn try_in_turn<F, Fut, T>(
    rotation: &Rotation,
    credential: &str,
    field: &str,
    mut attempt: F,
) -> Result<T, TokenError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, TokenError>>,
{
    let order = rotation.order();
    let mut first_error = None;
    for (tried, index) in order.iter().copied().enumerate() {
        match attempt(index).await {
            Ok(value) => {
                rotation.settle(credential, field, index);
                return Ok(value);
            }
            Err(error) if is_invalid_client(&error) && rotation.len() > 1 => {
                let last = tried + 1 == order.len();
                tracing::warn!(
                    credential = %credential,
                    entry = %format!("{field}[{index}]"),
                    error = %error,
                    "The identity provider refused this entry (invalid_client){}.",
                    if last { "; no entries left" } else { "; trying the next" }
                );
                first_error.get_or_insert(error);
            }
            Err(error) => return Err(error),
        }
    }
    Err(first_error.unwrap_or_else(|| TokenError::Config("no credential entries".to_owned())))
}
