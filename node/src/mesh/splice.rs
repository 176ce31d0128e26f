//! One direction of a forwarded connection: bytes from one socket to the other until the first
//! one's end of stream. On Linux through a pipe with splice(2), so the data stays in the kernel;
//! elsewhere through a buffer.

use std::io;

use tokio::net::TcpStream;

/// Copies from `from` to `to` until `from` ends; returns the byte count, and tells `sent` each
/// chunk's as it goes (the metrics count a long connection's bytes while it lasts). Does not
/// shut `to` down.
pub async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    sent: impl FnMut(u64) + Send,
) -> io::Result<u64> {
    #[cfg(target_os = "linux")]
    {
        linux::pump(from, to, sent).await
    }
    #[cfg(not(target_os = "linux"))]
    {
        buffered(from, to, sent).await
    }
}

#[cfg(not(target_os = "linux"))]
async fn buffered(
    from: &TcpStream,
    to: &TcpStream,
    mut sent_bytes: impl FnMut(u64) + Send,
) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => sent += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        sent_bytes(n as u64);
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// The pipe's size, and the most one splice moves.
    const PIPE_SIZE: usize = 1 << 20;

    struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        size: usize,
    }

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: fds is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both are open descriptors that we now own.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // A bigger pipe moves more per call; the default (64 KiB) when the system says no.
            // SAFETY: fcntl on a descriptor we own.
            let got = unsafe {
                libc::fcntl(
                    write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    PIPE_SIZE as libc::c_int,
                )
            };
            let size = if got > 0 { got as usize } else { 64 * 1024 };
            Ok(Pipe { read, write, size })
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: both are open descriptors; null offsets mean "the current position", which
        // splice requires for sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    pub async fn pump(
        from: &TcpStream,
        to: &TcpStream,
        mut sent: impl FnMut(u64) + Send,
    ) -> io::Result<u64> {
        let pipe = Pipe::new()?;
        let mut total = 0u64;
        loop {
            // Socket to pipe. The pipe is empty here, so a WouldBlock is the socket's: tokio
            // clears its read readiness and we wait for more.
            let n = loop {
                from.readable().await?;
                match from.try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe.write.as_raw_fd(), pipe.size)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            if n == 0 {
                return Ok(total);
            }
            // Pipe to socket, all of it, before reading more.
            let mut left = n;
            while left > 0 {
                to.writable().await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)
                }) {
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            total += n as u64;
            sent(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// 8 MiB of patterned bytes through the pump arrive intact and in order, and the pump ends
    /// at the sender's end of stream.
    #[tokio::test]
    async fn pumps_bytes_intact_until_end_of_stream() {
        let (mut client, from) = pair().await;
        let (to, mut server) = pair().await;
        let data: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        });
        let pump = tokio::spawn(async move {
            let n = pump(&from, &to, |_| {}).await.unwrap();
            socket2::SockRef::from(&to)
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
            n
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(pump.await.unwrap(), data.len() as u64);
        assert!(got == data, "the bytes changed on the way");
    }
}
