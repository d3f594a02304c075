//! A raw packet socket (`AF_PACKET`) on one interface of the calling
//! thread's network namespace: sends frames byte for byte, and receives
//! every frame the interface sees with the VLAN tag the kernel took out of
//! it on the way in (`PACKET_AUXDATA`), so a test can tell what was tagged.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// A frame seen on the interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The frame as the kernel hands it over (its VLAN tag taken out).
    pub frame: Vec<u8>,
    /// The 802.1Q TCI the frame arrived with, if it was tagged.
    pub vlan_tci: Option<u16>,
    /// This host sent it (else it arrived).
    pub outgoing: bool,
}

/// A packet socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

fn check(rc: libc::c_int, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

impl PacketSocket {
    /// Opens a socket on `iface` (in the calling thread's namespace) that
    /// sees every protocol.
    pub fn open(iface: &str) -> Result<PacketSocket> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        if ifindex == 0 {
            bail!("no interface {iface}");
        }
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
        check(fd, "socket(AF_PACKET)")?;
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = ifindex;
        // SAFETY: a sockaddr_ll of its own size.
        check(
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            },
            "bind(AF_PACKET)",
        )?;
        let on: libc::c_int = 1;
        // SAFETY: an int option of its own size.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_AUXDATA,
                    &on as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            },
            "setsockopt(PACKET_AUXDATA)",
        )?;
        Ok(PacketSocket { fd, ifindex })
    }

    /// Sends `frame` out of the interface as it is.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame buffer and a sockaddr_ll of their sizes.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n != frame.len() as isize {
            bail!("sendto(AF_PACKET): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The frames seen until `wait` passes without one (or `limit` were seen).
    pub fn drain(&self, wait: Duration, limit: usize) -> Result<Vec<Seen>> {
        let mut seen = Vec::new();
        let mut deadline = Instant::now() + wait;
        while seen.len() < limit {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(s) = self.recv(left)? {
                seen.push(s);
                deadline = Instant::now() + wait;
            }
        }
        Ok(seen)
    }

    /// One frame, or `None` if none comes within `timeout`.
    fn recv(&self, timeout: Duration) -> Result<Option<Seen>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) };
        check(ready, "poll")?;
        if ready == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        let mut control = [0u64; 64];
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut from as *mut libc::sockaddr_ll as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: buffers of the sizes given in `msg`.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error()).context("recvmsg(AF_PACKET)");
        }
        buf.truncate(n as usize);
        let mut vlan_tci = None;
        // SAFETY: walking the control messages the kernel wrote into `msg`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA {
                    let aux = std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const libc::tpacket_auxdata
                    );
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        vlan_tci = Some(aux.tp_vlan_tci);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        Ok(Some(Seen {
            frame: buf,
            vlan_tci,
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
        }))
    }
}
