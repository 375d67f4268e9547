//! TEMPORARY stub; the dev helper replaces this file.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("stub")]
    Stub,
}
pub async fn run(_listen: std::net::SocketAddr) -> Result<(), DevError> {
    Err(DevError::Stub)
}
