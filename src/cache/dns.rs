//! Host name resolution for every network client (HTTP, Attic, S3), without the C library.
//!
//! The release binaries link glibc statically, and a static glibc's `getaddrinfo` loads NSS
//! modules of its own version at run time: on a machine that lacks them (NixOS, a minimal
//! container, a chroot) no host name would ever resolve. This resolver reads `/etc/hosts`
//! and `/etc/resolv.conf` itself and asks the name servers over UDP/TCP, which is all a
//! binary cache host needs. Without a `resolv.conf` it asks 127.0.0.1, as the C libraries
//! do, rather than some public resolver the machine's owner never chose.
//!
//! One resolver serves the whole process, so its cache is shared between clients.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The process-wide resolver, built on first use (it must be built inside the runtime).
#[derive(Debug, Clone)]
pub struct Resolver {
    // The resolver's internals (caches, locks) are only read through `&self` and hold no
    // invariant a panic elsewhere could break; object_store wants resolvers unwind-safe.
    inner: Arc<AssertUnwindSafe<OnceLock<Result<TokioResolver, String>>>>,
}

/// The resolver every client of this process shares.
pub fn shared() -> Resolver {
    static SHARED: OnceLock<Resolver> = OnceLock::new();
    SHARED
        .get_or_init(|| Resolver {
            inner: Arc::new(AssertUnwindSafe(OnceLock::new())),
        })
        .clone()
}

impl Resolver {
    async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, BoxError> {
        let resolver = self
            .inner
            .get_or_init(build)
            .as_ref()
            .map_err(|e| BoxError::from(e.clone()))?;
        let found = resolver
            .lookup_ip(host)
            .await
            .map_err(|e| BoxError::from(format!("cannot resolve {host}: {e}")))?;
        let addrs: Vec<IpAddr> = found.iter().collect();
        if addrs.is_empty() {
            return Err(format!("{host} has no address").into());
        }
        Ok(addrs)
    }
}

fn build() -> Result<TokioResolver, String> {
    let mut builder = match TokioResolver::builder_tokio() {
        Ok(builder) => builder,
        Err(_) => {
            let local = NameServerConfig::udp_and_tcp(IpAddr::V4(Ipv4Addr::LOCALHOST));
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![local]),
                TokioRuntimeProvider::default(),
            )
        }
    };
    // IPv6 only when there is no IPv4 address: asking for both would make a name that
    // /etc/hosts maps to an IPv4 address wait on DNS for its IPv6 one (up to the DNS timeout
    // when no name server answers), where the C library takes the hosts file's answer.
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    builder
        .build()
        .map_err(|e| format!("cannot set up the DNS resolver: {e}"))
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.lookup(name.as_str()).await?;
            // Port 0: the connector puts in the URL's port.
            let addrs: reqwest::dns::Addrs =
                Box::new(addrs.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

impl object_store::client::DnsResolver for Resolver {
    fn resolve(&self, host: &str) -> object_store::client::DnsFuture {
        let this = self.clone();
        let host = host.to_owned();
        Box::pin(async move { this.lookup(&host).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_localhost_from_the_hosts_file() {
        let addrs = shared()
            .lookup("localhost")
            .await
            .expect("localhost resolves");
        assert!(addrs.iter().any(|ip| ip.is_loopback()), "{addrs:?}");
    }
}
