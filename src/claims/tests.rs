use super::*;
use crate::cache::Target as _;

const HASH: &str = "0123456789abcdfghijklmnpqrsvwxyz";

async fn machine(cache: &Path, name: &str, timeout: Duration) -> Arc<Claims> {
    let target = crate::cache::file::FileTarget::new(cache.to_path_buf(), 3);
    target.open().await.unwrap();
    Arc::new(Claims::new(
        Arc::new(target),
        ClaimOptions {
            machine: name.into(),
            timeout,
        },
    ))
}

fn asking(claims: &Arc<Claims>, hash: &str) -> tokio::task::JoinHandle<Answer> {
    let (claims, hash) = (claims.clone(), hash.to_owned());
    tokio::spawn(async move { claims.answer_miss(&hash).await })
}

#[tokio::test]
async fn the_second_machine_waits_for_the_first_and_gets_what_it_uploads() {
    let cache = tempfile::tempdir().unwrap();
    let a = machine(cache.path(), "a", Duration::from_secs(60)).await;
    let b = machine(cache.path(), "b", Duration::from_secs(60)).await;
    assert!(matches!(a.answer_miss(HASH).await, Answer::Miss));
    assert!(cache.path().join(format!("claims/{HASH}/a")).is_file());
    assert_eq!(a.state().held, [HASH]);

    let waiting = asking(&b, HASH);
    tokio::time::sleep(POLL * 2).await;
    assert!(!waiting.is_finished());
    assert_eq!(b.state().waiting, [HASH]);
    assert!(b.state().held.is_empty(), "a waiter holds no claim");

    std::fs::write(
        cache.path().join(format!("{HASH}.narinfo")),
        "StorePath: x\n",
    )
    .unwrap();
    a.release(HASH);
    match tokio::time::timeout(POLL * 4, waiting).await {
        Ok(Ok(Answer::Narinfo(body))) => assert_eq!(body, b"StorePath: x\n"),
        other => panic!("the waiter did not get the narinfo: {other:?}"),
    }
    assert_eq!(b.state().builds_saved, 1);
}

#[tokio::test]
async fn machines_asking_at_once_agree_on_one_builder_and_a_failure_frees_the_waiter() {
    let cache = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let hash = format!("{}{round}", &HASH[..31]);
        let a = machine(cache.path(), &format!("a{round}"), Duration::from_secs(60)).await;
        let b = machine(cache.path(), &format!("b{round}"), Duration::from_secs(60)).await;
        let (mut first, mut second) = (asking(&a, &hash), asking(&b, &hash));
        tokio::time::sleep(POLL).await;
        // Both sessions open with this claim: whichever listed first, the other's key
        // was read after that listing, so it is the larger and its machine waits.
        let (builder, waiter, waiting) = match (first.is_finished(), second.is_finished()) {
            (true, false) => (a, b, &mut second),
            (false, true) => (b, a, &mut first),
            (true, true) => panic!("round {round}: both machines build"),
            (false, false) => panic!("round {round}: both machines wait"),
        };
        assert_eq!(builder.state().held, std::slice::from_ref(&hash));
        assert_eq!(waiter.state().waiting, std::slice::from_ref(&hash));
        // The build fails: its claim goes, and the waiter builds at once.
        builder.withdraw(&hash).await;
        match tokio::time::timeout(POLL * 4, waiting).await {
            Ok(Ok(Answer::Miss)) => {}
            other => panic!("round {round}: the waiter did not take over: {other:?}"),
        }
        assert_eq!(waiter.state().held, std::slice::from_ref(&hash));
    }
}

/// A cache whose writes land `delay` after they are asked for.
struct SlowWrites {
    inner: crate::cache::file::FileTarget,
    delay: Duration,
}

#[async_trait::async_trait]
impl crate::cache::Target for SlowWrites {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn nar_format(&self) -> crate::cache::NarFormat {
        self.inner.nar_format()
    }
    async fn open(&self) -> Result<(), TargetError> {
        self.inner.open().await
    }
    async fn missing(
        &self,
        paths: &[crate::store::PathInfo],
    ) -> Result<std::collections::HashSet<StorePath>, TargetError> {
        self.inner.missing(paths).await
    }
    async fn put_nar(&self, nar: &crate::cache::PreparedNar) -> Result<String, TargetError> {
        self.inner.put_nar(nar).await
    }
    async fn put_narinfo(
        &self,
        narinfo: &crate::format::narinfo::NarInfo,
        nar: &crate::cache::PreparedNar,
    ) -> Result<(), TargetError> {
        self.inner.put_narinfo(narinfo, nar).await
    }
    async fn read_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        self.inner.read_small(key, limit).await
    }
    async fn write_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), TargetError> {
        tokio::time::sleep(self.delay).await;
        self.inner.write_small(key, bytes).await
    }
    async fn list(&self, prefix: &str) -> Result<Option<Vec<String>>, TargetError> {
        self.inner.list(prefix).await
    }
    async fn remove(&self, key: &str) -> Result<(), TargetError> {
        self.inner.remove(key).await
    }
}

#[tokio::test]
async fn a_session_that_opens_first_but_lands_last_waits_instead_of_building_too() {
    let cache = tempfile::tempdir().unwrap();
    let inner = crate::cache::file::FileTarget::new(cache.path().to_path_buf(), 3);
    inner.open().await.unwrap();
    let slow = Arc::new(Claims::new(
        Arc::new(SlowWrites {
            inner,
            delay: Duration::from_millis(300),
        }),
        ClaimOptions {
            // The tie-break favours it too.
            machine: "a".into(),
            timeout: Duration::from_secs(60),
        },
    ));
    let fast = machine(cache.path(), "b", Duration::from_secs(60)).await;
    let slow_asks = asking(&slow, HASH);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The fast machine claims and lists before the slow one's claim lands: it builds.
    let answered = tokio::time::timeout(Duration::from_millis(250), fast.answer_miss(HASH));
    assert!(matches!(answered.await, Ok(Answer::Miss)));
    // The slow one asked first, but its key is read once its claim has landed: it is
    // the younger session, and it waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!slow_asks.is_finished(), "both machines build");
    assert_eq!(slow.state().waiting, [HASH]);
    assert_eq!(fast.state().held, [HASH]);
    slow_asks.abort();
}

#[tokio::test]
async fn a_claim_whose_heartbeat_stops_is_waited_on_for_the_timeout_only() {
    let cache = tempfile::tempdir().unwrap();
    let dead = Claim {
        machine: "dead".into(),
        session: 1,
        beat: 3,
        pending: false,
    };
    let dir = cache.path().join(format!("claims/{HASH}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dead"), dead.to_string()).unwrap();
    let b = machine(cache.path(), "b", Duration::from_secs(1)).await;
    let started = Instant::now();
    assert!(matches!(b.answer_miss(HASH).await, Answer::Miss));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(b.state().held, [HASH]);
}

#[tokio::test]
async fn a_pending_claim_that_may_be_older_is_read_again_until_it_has_its_key() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().join(format!("claims/{HASH}"));
    std::fs::create_dir_all(&dir).unwrap();
    let write = move |session, pending| {
        let c = Claim {
            machine: "p".into(),
            session,
            beat: 1,
            pending,
        };
        std::fs::write(dir.join("p"), c.to_string()).unwrap();
    };
    let b = machine(cache.path(), "b", Duration::from_secs(60)).await;
    // Its lower bound is older than anything; the key it gets is younger.
    write(1, true);
    let rewrite = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        write(u64::MAX, false);
    });
    let started = Instant::now();
    assert!(matches!(b.answer_miss(HASH).await, Answer::Miss));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "decided on a pending key: {took:?}"
    );
    assert!(took < PENDING_WAIT, "{took:?}");
    assert_eq!(
        b.state().waits,
        0,
        "waited on a pending claim's lower bound"
    );
    rewrite.await.unwrap();

    // One whose lower bound is already younger than this machine's key is not waited for.
    let hash = format!("{}0", &HASH[..31]);
    let dir = cache.path().join(format!("claims/{hash}"));
    std::fs::create_dir_all(&dir).unwrap();
    let young = Claim {
        machine: "p".into(),
        session: u64::MAX,
        beat: 1,
        pending: true,
    };
    std::fs::write(dir.join("p"), young.to_string()).unwrap();
    let started = Instant::now();
    assert!(matches!(b.answer_miss(&hash).await, Answer::Miss));
    assert!(started.elapsed() < Duration::from_millis(250));
}

#[tokio::test]
async fn waits_go_one_way_only_so_crossed_claims_never_deadlock() {
    let cache = tempfile::tempdir().unwrap();
    let (p, q) = (HASH.to_owned(), format!("{}0", &HASH[..31]));
    let a = machine(cache.path(), "a", Duration::from_secs(60)).await;
    let b = machine(cache.path(), "b", Duration::from_secs(60)).await;
    assert!(matches!(a.answer_miss(&p).await, Answer::Miss));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(matches!(b.answer_miss(&q).await, Answer::Miss));
    // b's session is younger: b waits for a's p, a does not wait for b's q.
    let b_waits = asking(&b, &p);
    let started = Instant::now();
    assert!(matches!(a.answer_miss(&q).await, Answer::Miss));
    assert!(started.elapsed() < POLL, "the older session never waits");
    tokio::time::sleep(POLL * 2).await;
    assert!(!b_waits.is_finished());
    b_waits.abort();
}

#[test]
fn the_lock_table_is_read_for_the_inode_asked_about() {
    let table = "1: POSIX  ADVISORY  WRITE 800 fe:00:123 0 EOF\n\
                 2: FLOCK  ADVISORY  WRITE 31152 fe:00:9576259 0 EOF\n\
                 2: -> FLOCK  ADVISORY  WRITE 31160 fe:00:777 0 EOF\n";
    assert!(locked_in_table(table, 0xfe, 0, 9_576_259));
    assert!(locked_in_table(table, 0xfe, 0, 123));
    assert!(!locked_in_table(table, 0xfe, 1, 123), "another device");
    assert!(!locked_in_table(table, 0xfe, 0, 777), "only waiting for it");
    assert!(!locked_in_table("", 0xfe, 0, 123));
}

#[test]
fn a_machine_waits_only_on_an_older_claim_and_on_the_oldest() {
    let c = |machine: &str, session| Claim {
        machine: machine.into(),
        session,
        beat: 1,
        pending: false,
    };
    let mine = ClaimKey {
        session: 100,
        machine: "m".into(),
    };
    let claims = [
        c("x", 150),
        c("y", 90),
        c("z", 80),
        c("a", 100),
        c("n", 100),
    ];
    assert_eq!(
        older_than(&claims, &mine).map(|c| c.machine),
        Some("z".into())
    );
    // On a tie the name decides: "a" < "m" < "n".
    assert_eq!(
        older_than(&claims[3..], &mine).map(|c| c.machine),
        Some("a".into())
    );
    assert!(older_than(&[c("x", 150), c("n", 100)], &mine).is_none());
    // Whatever two machines see, they never each find the other older.
    let theirs = ClaimKey {
        session: 90,
        machine: "y".into(),
    };
    let my_claim = c("m", 100);
    assert!(older_than(&[c("y", 90)], &mine).is_some());
    assert!(older_than(&[my_claim], &theirs).is_none());
}
