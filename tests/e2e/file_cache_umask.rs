//! A file:// cache written by narpost running under the unit's UMask=0077 (systemd's
//! narpost.service and the NixOS module): a web server running as another user must still
//! read every file of it.

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use common::{Env, assert_substitutes, build_rich_closure, pushed, run};

#[test]
fn cache_written_under_umask_077_is_readable_by_other_users() {
    let env = Env::new();
    // Another user must reach the cache through the scratch directory.
    std::fs::set_permissions(env.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (key, public) = env.keygen("umask-test-1");
    let (top, closure) = build_rich_closure(&env);
    let cache = env.path().join("cache");
    let url = format!("file://{}", cache.display());

    let mut cmd = common::push_cmd(&env, &url, &key, &top);
    // SAFETY: umask is async-signal-safe and touches nothing but the child's own mask.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            Ok(())
        });
    }
    pushed(&mut cmd);

    // Everything, read as nobody.
    run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["find"])
        .arg(&cache)
        .args(["-type", "f", "-exec", "cat", "{}", "+"])
        .stdout(std::process::Stdio::null()));
    for dir in ["", "nar"] {
        let mode = std::fs::metadata(cache.join(dir))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755, "{dir:?}");
    }
    assert_substitutes(&env, &url, &public, &closure);
}
