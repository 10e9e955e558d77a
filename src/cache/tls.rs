//! The machine's CA certificates, asked about once per process.
//!
//! The HTTP clients verify https servers against the system's roots (SSL_CERT_FILE,
//! SSL_CERT_DIR, /etc/ssl/certs and the like), and refuse to be built at all when there are
//! none, even for a plain-http cache. A static binary meets such machines (a bare container,
//! a chroot), so without roots narpost builds its clients with an empty trust store: plain
//! http works, and an https cache gets one clear line up front instead of a handshake error.

use std::sync::OnceLock;

/// True when the system offers no CA certificate at all.
pub fn no_system_roots() -> bool {
    static MISSING: OnceLock<bool> = OnceLock::new();
    *MISSING.get_or_init(|| rustls_native_certs::load_native_certs().certs.is_empty())
}

/// The error for an https URL on a machine without CA certificates, if that is the case.
pub fn https_without_roots(url: &str) -> Option<String> {
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    (https && no_system_roots()).then(|| {
        format!(
            "{url}: no CA certificates on this machine to check the server's with; install the \
             CA bundle (e.g. the ca-certificates package) or point SSL_CERT_FILE at one"
        )
    })
}
