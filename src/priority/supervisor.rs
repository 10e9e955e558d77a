//! The original process of a narpost that forked to lower itself (see [`super`]), and how
//! `watch-exec` runs its command through it.
//!
//! The original process does no work of its own: it waits on a signalfd and (for
//! `watch-exec`) a socket to the worker. Signals it gets are passed on: to the command while
//! one runs (as `watch-exec` itself does), otherwise to the worker. SIGTSTP stops the worker
//! and then itself, and SIGCONT continues the worker, so job control stops narpost as a
//! whole. It exits with the worker's exit code, or dies of the signal that killed the worker;
//! when a command ran, with the command's exit code (128 + signal if it was killed), which is
//! what `watch-exec` returns anyway, also if the worker died.
//!
//! The socket speaks lines. Worker to original: `run` (start the command: the original
//! process parsed the same command line, so it knows which) and `signal N`. Original to
//! worker: `started PID` or `failed ERRNO`, then `exited STATUS` (the raw wait status).
//!
//! Written by hand with libc: no crate offers a supervisor that must be forked before any
//! thread exists and keep the command in the caller's session.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::Mutex;

/// Signals passed on as they are.
const FORWARDED: [i32; 6] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
];
/// Signals the original process handles itself.
const OWN: [i32; 3] = [libc::SIGCHLD, libc::SIGTSTP, libc::SIGCONT];

/// The worker's end of the socket, until [`spawn_command`] takes it.
static LINK: Mutex<Option<UnixStream>> = Mutex::new(None);

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set; sigaddset only writes into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in FORWARDED.iter().chain(OWN.iter()) {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Forks. Returns in the worker; the original process supervises it and never returns.
/// The caller must be the only thread.
pub(super) fn fork_worker(command: Option<&[String]>) -> io::Result<()> {
    let set = signal_set();
    // SAFETY: plain libc calls on valid, initialised sigsets.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // Blocked from before the fork, so a signal arriving while the worker starts waits for
    // the signalfd instead of killing the original process.
    if unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unblock = |old: &libc::sigset_t| {
        // SAFETY: as above.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
    };
    let link = match command.map(|_| UnixStream::pair()).transpose() {
        Ok(l) => l,
        Err(e) => {
            unblock(&old);
            return Err(e);
        }
    };
    let original = rustix::process::getpid();
    // SAFETY: the process has one thread (checked by the caller), so the child gets a
    // consistent copy of every lock and allocator.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        unblock(&old);
        return Err(e);
    }
    if pid == 0 {
        // Killed outright with the original process, as a single process would be.
        let _ =
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
        if rustix::process::getppid() != Some(original) {
            // The original process died before the line above took effect.
            std::process::exit(1);
        }
        unblock(&old);
        if let Some((_, worker_end)) = link {
            *LINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(worker_end);
        }
        return Ok(());
    }
    let link = link.map(|(original_end, _)| original_end);
    let command = command.map(<[String]>::to_vec);
    supervise(pid, &set, old, link, command)
}

struct Supervisor {
    worker: i32,
    /// The worker's raw wait status, once it exited.
    worker_status: Option<i32>,
    link: Option<UnixStream>,
    buf: Vec<u8>,
    command: Option<Vec<String>>,
    /// The signal mask narpost was started with, which the command gets.
    started_mask: libc::sigset_t,
    child: Option<std::process::Child>,
    child_status: Option<ExitStatus>,
}

fn supervise(
    worker: i32,
    set: &libc::sigset_t,
    started_mask: libc::sigset_t,
    link: Option<UnixStream>,
    command: Option<Vec<String>>,
) -> ! {
    // SAFETY: a valid sigset; the fd is ours.
    let sfd = unsafe { libc::signalfd(-1, set, libc::SFD_CLOEXEC) };
    let mut s = Supervisor {
        worker,
        worker_status: None,
        link,
        buf: Vec::new(),
        command,
        started_mask,
        child: None,
        child_status: None,
    };
    if sfd < 0 {
        eprintln!(
            "narpost: cannot receive signals ({}); signals to narpost do not reach its uploads",
            io::Error::last_os_error()
        );
    }
    loop {
        if s.worker_status.is_some() && (s.child.is_none() || s.child_status.is_some()) {
            s.exit();
        }
        let mut fds = vec![libc::pollfd {
            fd: sfd,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(l) = &s.link {
            fds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Without a signalfd, notice the worker's exit by polling.
        let timeout = if sfd < 0 { 200 } else { -1 };
        // SAFETY: `fds` is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            s.reap();
            continue;
        }
        if sfd < 0 {
            s.reap();
        } else if fds[0].revents & libc::POLLIN != 0 {
            // SAFETY: reading whole signalfd_siginfo records into a buffer of that type.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let r =
                unsafe { libc::read(sfd, (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if r == size as isize {
                s.on_signal(info.ssi_signo as i32);
            }
        }
        if fds.len() > 1 && fds[1].revents != 0 {
            s.on_message();
        }
    }
}

impl Supervisor {
    fn on_signal(&mut self, sig: i32) {
        match sig {
            libc::SIGCHLD => self.reap(),
            libc::SIGTSTP => {
                // SAFETY: kill with pids of this process and its own child.
                unsafe {
                    libc::kill(self.worker, libc::SIGSTOP);
                    libc::kill(libc::getpid(), libc::SIGSTOP);
                }
            }
            libc::SIGCONT => unsafe {
                // SAFETY: as above.
                libc::kill(self.worker, libc::SIGCONT);
            },
            sig => {
                let target = match (&self.child, self.child_status) {
                    (Some(c), None) => c.id() as i32,
                    _ if self.worker_status.is_none() => self.worker,
                    _ => return,
                };
                // SAFETY: kill of an unreaped child of ours, so the pid cannot be reused.
                unsafe { libc::kill(target, sig) };
            }
        }
    }

    fn reap(&mut self) {
        if self.worker_status.is_none() {
            let mut status = 0;
            // SAFETY: waitpid on our child with a valid status pointer.
            let r = unsafe { libc::waitpid(self.worker, &mut status, libc::WNOHANG) };
            if r == self.worker {
                self.worker_status = Some(status);
                self.link = None;
                if self.child.is_some() && self.child_status.is_none() {
                    eprintln!(
                        "narpost: uploads stopped (the uploading process exited); waiting for the command"
                    );
                }
            }
        }
        if self.child_status.is_none()
            && let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child_status = Some(status);
            self.send(&format!("exited {}\n", status.into_raw()));
        }
    }

    fn send(&mut self, line: &str) {
        if let Some(l) = &mut self.link
            && l.write_all(line.as_bytes()).is_err()
        {
            self.link = None;
        }
    }

    fn on_message(&mut self) {
        let Some(link) = &mut self.link else {
            return;
        };
        let mut chunk = [0u8; 256];
        match link.read(&mut chunk) {
            Ok(0) | Err(_) => {
                self.link = None;
                return;
            }
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
        }
        let buf = std::mem::take(&mut self.buf);
        let mut rest = &buf[..];
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&rest[..end]).into_owned();
            rest = &rest[end + 1..];
            self.handle(line.trim());
        }
        self.buf = rest.to_vec();
    }

    fn handle(&mut self, line: &str) {
        if line == "run" && self.child.is_none() {
            let Some((program, args)) = self.command.as_ref().and_then(|c| c.split_first()) else {
                self.send(&format!("failed {}\n", libc::EINVAL));
                return;
            };
            let mut cmd = std::process::Command::new(program);
            cmd.args(args);
            let mask = self.started_mask;
            // SAFETY: sigprocmask is async-signal-safe, and `mask` is a copy.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    // The signals blocked here for the signalfd must not stay blocked in it.
                    if libc::sigprocmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            match cmd.spawn() {
                Ok(c) => {
                    let pid = c.id();
                    self.child = Some(c);
                    self.send(&format!("started {pid}\n"));
                }
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::ENOEXEC);
                    self.send(&format!("failed {errno}\n"));
                }
            }
        } else if let Some(n) = line.strip_prefix("signal ")
            && let Ok(sig) = n.parse::<i32>()
            && let (Some(c), None) = (&self.child, self.child_status)
        {
            // SAFETY: the command is our unreaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    fn exit(&self) -> ! {
        if let Some(status) = self.child_status {
            let code = match status.code() {
                Some(c) => c.clamp(0, 255),
                None => 128 + status.signal().unwrap_or(0).clamp(0, 127),
            };
            std::process::exit(code);
        }
        let status = self.worker_status.unwrap_or(0);
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            // Die of the same signal, so the caller sees what the worker died of.
            // SAFETY: resetting one signal's disposition and unblocking it, then raising it.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
            }
            std::process::exit(128 + sig);
        }
        std::process::exit(libc::WEXITSTATUS(status));
    }
}

/// `watch-exec`'s command, started in narpost's own session or, when narpost forked to
/// lower itself, by the original process in the caller's session.
pub enum Child {
    Local(tokio::process::Child),
    Remote {
        pid: u32,
        status: tokio::sync::oneshot::Receiver<io::Result<ExitStatus>>,
        link: tokio::net::unix::OwnedWriteHalf,
    },
}

/// Starts `program` with `args` where the command keeps the session, process group,
/// terminal, priority and signals narpost was started with. Through the original process,
/// the command is the one on the original command line, which `program` and `args` are.
pub async fn spawn_command(program: &str, args: &[String]) -> io::Result<Child> {
    let link = LINK.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(link) = link else {
        return tokio::process::Command::new(program)
            .args(args)
            .spawn()
            .map(Child::Local);
    };
    link.set_nonblocking(true)?;
    let (read, mut write) = tokio::net::UnixStream::from_std(link)?.into_split();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    write.write_all(b"run\n").await?;
    let mut lines = tokio::io::BufReader::new(read).lines();
    let reply = lines.next_line().await?.unwrap_or_default();
    let pid = if let Some(pid) = reply.strip_prefix("started ") {
        pid.parse::<u32>()
            .map_err(|_| io::Error::other(format!("unexpected reply {reply:?}")))?
    } else if let Some(errno) = reply.strip_prefix("failed ") {
        return Err(io::Error::from_raw_os_error(
            errno.parse().unwrap_or(libc::EIO),
        ));
    } else {
        return Err(io::Error::other("the original narpost process is gone"));
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let status = loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if let Some(raw) = line.strip_prefix("exited ")
                        && let Ok(raw) = raw.parse::<i32>()
                    {
                        break Ok(ExitStatus::from_raw(raw));
                    }
                }
                Ok(None) => break Err(io::Error::other("the original narpost process is gone")),
                Err(e) => break Err(e),
            }
        };
        let _ = tx.send(status);
    });
    Ok(Child::Remote {
        pid,
        status: rx,
        link: write,
    })
}

impl Child {
    pub fn id(&self) -> Option<u32> {
        match self {
            Child::Local(c) => c.id(),
            Child::Remote { pid, .. } => Some(*pid),
        }
    }

    /// Waits for the command to exit. Cancel-safe.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match self {
            Child::Local(c) => c.wait().await,
            Child::Remote { status, .. } => match status.await {
                Ok(s) => s,
                Err(_) => Err(io::Error::other("the original narpost process is gone")),
            },
        }
    }

    /// Passes `sig` to the command, if it still runs.
    pub async fn signal(&mut self, sig: rustix::process::Signal) {
        match self {
            Child::Local(c) => {
                if let Some(pid) = c
                    .id()
                    .and_then(|id| rustix::process::Pid::from_raw(id as i32))
                {
                    let _ = rustix::process::kill_process(pid, sig);
                }
            }
            Child::Remote { link, .. } => {
                use tokio::io::AsyncWriteExt;
                let _ = link
                    .write_all(format!("signal {}\n", sig.as_raw()).as_bytes())
                    .await;
            }
        }
    }
}
