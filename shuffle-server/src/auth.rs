//! Who may use the server: an optional server-wide admission token, and the
//! secret of each app (DESIGN.md, "Security").
//!
//! The first `Hello` for an app's name, presented without a secret, creates
//! the app and a secret for it — 256 bits from the operating system's
//! random source — which the server returns in `Welcome`. Every later
//! connection for the app must present that secret; a connection that
//! names the app without it, or with another, gets `UnknownApp`, the same
//! answer as for an app that does not exist, so nothing about the app or
//! its shuffles leaks. (Creating an app whose name is taken fails with
//! `AppExists`: names are unique per server.) Secrets and tokens are
//! compared in constant time.

use shuffle_protocol::{APP_SECRET_BYTES, AppId, AppSecret, ErrorKind, ServiceError};
use subtle::ConstantTimeEq;

/// A new secret for an app.
pub fn generate_secret() -> Result<AppSecret, ServiceError> {
    let mut bytes = [0u8; APP_SECRET_BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|e| ServiceError::new(ErrorKind::Io, format!("the OS random source failed: {e}")))?;
    Ok(AppSecret(bytes.iter().map(|b| format!("{b:02x}")).collect()))
}

/// Whether `presented` is `expected`, compared in constant time.
pub fn secrets_match(expected: &str, presented: &str) -> bool {
    bool::from(expected.as_bytes().ct_eq(presented.as_bytes()))
}

/// Checks the server-wide admission token, if the server has one.
pub fn check_token(expected: Option<&str>, presented: Option<&str>) -> Result<(), ServiceError> {
    let Some(expected) = expected else { return Ok(()) };
    if presented.is_some_and(|t| secrets_match(expected, t)) {
        return Ok(());
    }
    let what = if presented.is_some() { "presented a wrong auth token" } else { "presented no auth token" };
    Err(ServiceError::new(ErrorKind::Unauthenticated, format!("authentication failed: the connection {what}")))
}

/// The answer for an app a connection may not see.
pub fn unknown_app(app: &AppId) -> ServiceError {
    ServiceError::new(
        ErrorKind::UnknownApp,
        format!(
            "app {app} is not known to this connection: it does not exist, was unregistered or expired, \
             or the secret presented is not its secret"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_well_formed() {
        let (a, b) = (generate_secret().unwrap(), generate_secret().unwrap());
        assert!(a.is_well_formed() && b.is_well_formed());
        assert_ne!(a, b);
    }

    #[test]
    fn tokens_must_match_exactly() {
        assert!(check_token(None, None).is_ok());
        assert!(check_token(Some("secret"), Some("secret")).is_ok());
        for presented in [None, Some("secreT"), Some("secret2"), Some("")] {
            assert_eq!(check_token(Some("secret"), presented).unwrap_err().kind, ErrorKind::Unauthenticated);
        }
    }
}
