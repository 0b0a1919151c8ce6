//! Packet capture for the namespace harness: an AF_PACKET socket bound to one interface,
//! read on a thread inside the namespace, so a test can assert what did (or never did) cross
//! the WAN in plaintext. Keeps every frame in memory up to `MAX_CAPTURE_BYTES`; reports frames
//! the kernel dropped, so that an absence is only trusted when nothing was missed.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};

use super::{COMMAND_TIMEOUT, Netns};

/// A capture keeps at most this much, so a long bulk transfer cannot exhaust memory.
const MAX_CAPTURE_BYTES: usize = 256 << 20;

/// Start capturing on `iface` in `ns`; the socket is bound when this returns.
pub(super) fn start(ns: &Netns, iface: &str) -> Capture {
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = mpsc::channel();
    let (flag, dev) = (stop.clone(), iface.to_string());
    let thread = ns.thread(move || capture_frames(&dev, &flag, &ready_tx));
    match ready_rx.recv_timeout(COMMAND_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("capture on {iface} in {}: {e}", ns.name()),
        Err(_) => panic!("capture on {iface} in {} did not start", ns.name()),
    }
    Capture { stop, thread: Some(thread) }
}

/// A capture running on a thread inside the namespace; `stop` returns what it saw.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Captured, String>>>,
}

impl Capture {
    /// Stop and return every frame seen (frames already queued in the socket included).
    pub fn stop(mut self) -> Captured {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("capture thread");
        match thread.join() {
            Ok(r) => r.unwrap_or_else(|e| panic!("capture: {e}")),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A frame as it crossed the interface, link-layer header included.
#[derive(Clone, Debug)]
pub struct Frame {
    /// Sent by this namespace (else received).
    pub outgoing: bool,
    pub data: Vec<u8>,
}

/// The TCP or UDP payload of one frame.
#[derive(Clone, Debug)]
pub struct Segment<'a> {
    /// `6` (TCP) or `17` (UDP).
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// What a capture saw.
#[derive(Debug, Default)]
pub struct Captured {
    pub frames: Vec<Frame>,
    /// Frames the kernel dropped because the capture did not keep up (then `contains` may miss).
    pub kernel_drops: u32,
    /// Frames not kept because `MAX_CAPTURE_BYTES` was reached.
    pub over_limit: usize,
    /// Frames longer than the receive buffer (only their start was kept).
    pub cut_short: usize,
}

impl Captured {
    /// Whether every frame that crossed is here, so an absence means something.
    pub fn is_complete(&self) -> bool {
        self.kernel_drops == 0 && self.over_limit == 0 && self.cut_short == 0
    }

    pub fn bytes(&self) -> usize {
        self.frames.iter().map(|f| f.data.len()).sum()
    }

    /// The TCP and UDP payloads, in capture order (IPv4 non-first fragments and other
    /// protocols left out).
    pub fn segments(&self) -> Vec<Segment<'_>> {
        self.frames.iter().filter_map(|f| parse_segment(&f.data)).filter(|s| !s.payload.is_empty()).collect()
    }

    /// Whether `marker` appears in any frame, or in the bytes of one flow (same protocol,
    /// source and destination) joined in capture order, so a marker split across TCP segments
    /// is found too.
    pub fn contains(&self, marker: &[u8]) -> bool {
        if self.frames.iter().any(|f| find(&f.data, marker)) {
            return true;
        }
        let mut flows: HashMap<(u8, SocketAddr, SocketAddr), Vec<u8>> = HashMap::new();
        for s in self.segments() {
            flows.entry((s.proto, s.src, s.dst)).or_default().extend_from_slice(s.payload);
        }
        flows.values().any(|stream| find(stream, marker))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn parse_segment(frame: &[u8]) -> Option<Segment<'_>> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (proto, src, dst, l4): (u8, IpAddr, IpAddr, &[u8]) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            // A GSO frame larger than 64 KiB carries 0 here (BIG TCP): the frame's length counts.
            let end = if total == 0 { ip.len() } else { total.min(ip.len()) };
            let frag_offset = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]) & 0x1fff;
            if frag_offset != 0 {
                return None;
            }
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (*ip.get(9)?, Ipv4Addr::from(src).into(), Ipv4Addr::from(dst).into(), ip.get(ihl..end)?)
        }
        0x86dd => {
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let end = if len == 0 { ip.len() } else { (40 + len).min(ip.len()) };
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (*ip.get(6)?, Ipv6Addr::from(src).into(), Ipv6Addr::from(dst).into(), ip.get(40..end)?)
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes([*l4.get(at)?, *l4.get(at + 1)?]));
    let (sport, dport) = (port(0)?, port(2)?);
    let payload = match proto {
        6 => l4.get(usize::from(l4.get(12)? >> 4) * 4..)?,
        17 => l4.get(8..)?,
        _ => return None,
    };
    Some(Segment { proto, src: SocketAddr::new(src, sport), dst: SocketAddr::new(dst, dport), payload })
}

/// `struct tpacket_stats` of <linux/if_packet.h>.
#[repr(C)]
#[derive(Default)]
struct TpacketStats {
    tp_packets: u32,
    tp_drops: u32,
}

/// <linux/if_packet.h> and <asm/socket.h>, spelled out so as not to depend on which libc
/// version exports them.
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_OUTGOING: u8 = 4;
const SO_RCVBUFFORCE: libc::c_int = 33;
/// Room for a 64 KiB GSO frame and more (BIG TCP), so frames are rarely cut.
const CAPTURE_FRAME_BUFFER: usize = 256 << 10;
/// Socket buffer for bursts between two reads.
const CAPTURE_SOCKET_BUFFER: libc::c_int = 32 << 20;

/// The capture loop, on a thread inside the namespace: an AF_PACKET socket bound to `dev`.
fn capture_frames(dev: &str, stop: &AtomicBool, ready: &mpsc::Sender<Result<(), String>>) -> Result<Captured, String> {
    let fail = |what: &str| {
        let e = format!("{what}: {}", std::io::Error::last_os_error());
        let _ = ready.send(Err(e.clone()));
        e
    };
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    // Protocol 0 until bind: the socket sees nothing from other interfaces meanwhile.
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket(AF_PACKET)"));
    }
    struct Fd(libc::c_int);
    impl Drop for Fd {
        fn drop(&mut self) {
            // SAFETY: closing the descriptor this guard owns, once.
            unsafe { libc::close(self.0) };
        }
    }
    let fd = Fd(fd);
    let cname = std::ffi::CString::new(dev).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(fail(&format!("no interface {dev}")));
    }
    let setopt = |level: libc::c_int, name: libc::c_int, value: &[u8]| -> bool {
        // SAFETY: `value` is valid for its length for the duration of the call.
        unsafe { libc::setsockopt(fd.0, level, name, value.as_ptr().cast(), value.len() as libc::socklen_t) == 0 }
    };
    // Best effort: a smaller buffer only makes kernel_drops likelier, and that is reported.
    setopt(libc::SOL_SOCKET, SO_RCVBUFFORCE, &CAPTURE_SOCKET_BUFFER.to_ne_bytes());
    let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    // SAFETY: viewing a plain C struct as bytes for setsockopt.
    let tv_bytes = unsafe { std::slice::from_raw_parts((&tv as *const libc::timeval).cast::<u8>(), std::mem::size_of::<libc::timeval>()) };
    if !setopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, tv_bytes) {
        return Err(fail("SO_RCVTIMEO"));
    }
    // SAFETY: zero is a valid sockaddr_ll; the fields set are the ones bind(2) reads.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = eth_p_all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a sockaddr_ll of the size given.
    let bound = unsafe { libc::bind(fd.0, (&sll as *const libc::sockaddr_ll).cast(), std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t) };
    if bound != 0 {
        return Err(fail(&format!("bind to {dev}")));
    }
    let _ = ready.send(Ok(()));

    let mut out = Captured::default();
    let mut kept = 0usize;
    let mut buf = vec![0u8; CAPTURE_FRAME_BUFFER];
    // After `stop`, read what is already queued without waiting, then finish.
    let mut draining = false;
    loop {
        if !draining && stop.load(Ordering::SeqCst) {
            draining = true;
        }
        // SAFETY: zero is a valid sockaddr_ll to be filled by recvfrom.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let flags = libc::MSG_TRUNC | if draining { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: `buf` and `from` are valid for the lengths given.
        let n =
            unsafe { libc::recvfrom(fd.0, buf.as_mut_ptr().cast(), buf.len(), flags, (&mut from as *mut libc::sockaddr_ll).cast(), &mut from_len) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted if !draining => continue,
                std::io::ErrorKind::WouldBlock => break,
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(format!("recvfrom on {dev}: {err}")),
            }
        }
        let len = n as usize;
        if len > buf.len() {
            out.cut_short += 1;
        }
        let data = &buf[..len.min(buf.len())];
        if kept + data.len() > MAX_CAPTURE_BYTES {
            out.over_limit += 1;
            continue;
        }
        kept += data.len();
        out.frames.push(Frame { outgoing: from.sll_pkttype == PACKET_OUTGOING, data: data.to_vec() });
    }
    let mut stats = TpacketStats::default();
    let mut stats_len = std::mem::size_of::<TpacketStats>() as libc::socklen_t;
    // SAFETY: `stats` is a tpacket_stats of the size given.
    let got = unsafe { libc::getsockopt(fd.0, libc::SOL_PACKET, PACKET_STATISTICS, (&mut stats as *mut TpacketStats).cast(), &mut stats_len) };
    if got == 0 {
        out.kernel_drops = stats.tp_drops;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_udp_frame_parses_into_its_segment() {
        // Ethernet + IPv4 (20) + UDP (8) + "hi".
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&[0x20, 0xfb, 0x01, 0xbb, 0, 10, 0, 0]);
        f.extend_from_slice(b"hi");
        let c = Captured { frames: vec![Frame { outgoing: true, data: f }], ..Default::default() };
        let s = &c.segments()[0];
        assert_eq!(
            (s.proto, s.src, s.dst, s.payload),
            (17, SocketAddr::from(([10, 0, 0, 1], 8443)), SocketAddr::from(([10, 0, 0, 2], 443)), &b"hi"[..])
        );
    }
}
