//! Utilities to work with raw WebSocket frames.

pub mod coding;

#[allow(clippy::module_inception)]
mod frame;
mod mask;
mod utf8;

pub use self::{
    frame::{CloseFrame, Frame, FrameHeader},
    utf8::Utf8Bytes,
};

use crate::{
    error::{CapacityError, Error, ProtocolError, Result},
    protocol::frame::mask::apply_mask,
    Message,
};
use bytes::BytesMut;
use log::*;
use std::io::{self, Cursor, Error as IoError, ErrorKind as IoErrorKind, Read, Write};

/// Read buffer size used for `FrameSocket`.
const READ_BUF_LEN: usize = 128 * 1024;

/// A reader and writer for WebSocket frames.
#[derive(Debug)]
pub struct FrameSocket<Stream> {
    /// The underlying network stream.
    stream: Stream,
    /// Codec for reading/writing frames.
    codec: FrameCodec,
}

impl<Stream> FrameSocket<Stream> {
    /// Create a new frame socket.
    pub fn new(stream: Stream) -> Self {
        FrameSocket { stream, codec: FrameCodec::new(READ_BUF_LEN) }
    }

    /// Create a new frame socket from partially read data.
    pub fn from_partially_read(stream: Stream, part: Vec<u8>) -> Self {
        FrameSocket { stream, codec: FrameCodec::from_partially_read(part, READ_BUF_LEN) }
    }

    /// Extract a stream from the socket.
    pub fn into_inner(self) -> (Stream, BytesMut) {
        (self.stream, self.codec.in_buffer)
    }

    /// Returns a shared reference to the inner stream.
    pub fn get_ref(&self) -> &Stream {
        &self.stream
    }

    /// Returns a mutable reference to the inner stream.
    pub fn get_mut(&mut self) -> &mut Stream {
        &mut self.stream
    }
}

impl<Stream> FrameSocket<Stream>
where
    Stream: Read,
{
    /// Read a frame from stream.
    pub fn read(&mut self, max_size: Option<usize>) -> Result<Option<Frame>> {
        self.codec.read_frame(&mut self.stream, max_size, false, true)
    }
}

impl<Stream> FrameSocket<Stream>
where
    Stream: Write,
{
    /// Writes and immediately flushes a frame.
    /// Equivalent to calling [`write`](Self::write) then [`flush`](Self::flush).
    pub fn send(&mut self, frame: Frame) -> Result<()> {
        self.write(frame)?;
        self.flush()
    }

    /// Write a frame to stream.
    ///
    /// A subsequent call should be made to [`flush`](Self::flush) to flush writes.
    ///
    /// This function guarantees that the frame is queued unless [`Error::WriteBufferFull`]
    /// is returned.
    /// In order to handle WouldBlock or Incomplete, call [`flush`](Self::flush) afterwards.
    pub fn write(&mut self, frame: Frame) -> Result<()> {
        self.codec.buffer_frame(&mut self.stream, frame)
    }

    /// Flush writes.
    pub fn flush(&mut self) -> Result<()> {
        self.codec.write_out_buffer(&mut self.stream)?;
        Ok(self.stream.flush()?)
    }
}

/// A codec for WebSocket frames.
#[derive(Debug)]
pub(super) struct FrameCodec {
    /// Buffer to read data from the stream.
    in_buffer: BytesMut,
    in_buf_max_read: usize,
    /// Buffer to send packets to the network.
    out_buffer: Vec<u8>,
    /// Capacity limit for `out_buffer`.
    max_out_buffer_len: usize,
    /// Buffer target length to reach before writing to the stream
    /// on calls to `buffer_frame`.
    ///
    /// Setting this to non-zero will buffer small writes from hitting
    /// the stream.
    out_buffer_write_len: usize,
    /// Header and remaining size of the incoming packet being processed.
    header: Option<(FrameHeader, u64)>,
}

/// wsgate patch: a frame header read straight off `head` (its first two bytes at least):
/// the header's length and the payload's declared length; `None` while the header is not all
/// there.
fn raw_header(head: &[u8]) -> Option<(usize, u64)> {
    let second = *head.get(1)?;
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    let (extra, len) = match second & 0x7F {
        126 => (2, u64::from(u16::from_be_bytes(*head.get(2..4)?.first_chunk()?))),
        127 => (8, u64::from_be_bytes(*head.get(2..10)?.first_chunk()?)),
        short => (0, u64::from(short)),
    };
    let header_len = 2 + extra + mask;
    (head.len() >= header_len).then_some((header_len, len))
}

/// wsgate patch: the whole length (header and payload) of the frame `buf` starts with, once
/// its header is all there.
fn raw_frame_len(buf: &[u8]) -> Option<u64> {
    let (header_len, len) = raw_header(buf)?;
    (header_len as u64).checked_add(len)
}

impl FrameCodec {
    /// Create a new frame codec.
    pub(super) fn new(in_buf_len: usize) -> Self {
        Self {
            // wsgate patch: the input buffer starts released, like an idle socket's: the first
            // read goes through `read_released` (a per-thread scratch buffer, the buffer
            // allocated only when bytes arrive) instead of zero-filling a full read's room on
            // every poll until the client's first frame arrives.
            in_buffer: BytesMut::new(),
            in_buf_max_read: in_buf_len.max(FrameHeader::MAX_SIZE),
            out_buffer: <_>::default(),
            max_out_buffer_len: usize::MAX,
            out_buffer_write_len: 0,
            header: None,
        }
    }

    /// Create a new frame codec from partially read data.
    pub(super) fn from_partially_read(part: Vec<u8>, min_in_buf_len: usize) -> Self {
        // wsgate patch: as in `new`, no room is reserved ahead of the first read: with nothing
        // left over from the handshake the buffer starts released, and bytes left over are
        // kept as they are (the read that completes their frame makes room for itself).
        let in_buffer = if part.is_empty() {
            BytesMut::new()
        } else {
            BytesMut::from(&part[..])
        };
        Self {
            in_buffer,
            in_buf_max_read: min_in_buf_len.max(FrameHeader::MAX_SIZE),
            out_buffer: <_>::default(),
            max_out_buffer_len: usize::MAX,
            out_buffer_write_len: 0,
            header: None,
        }
    }

    /// Sets a maximum size for the out buffer.
    pub(super) fn set_max_out_buffer_len(&mut self, max: usize) {
        self.max_out_buffer_len = max;
    }

    /// Sets [`Self::buffer_frame`] buffer target length to reach before
    /// writing to the stream.
    pub(super) fn set_out_buffer_write_len(&mut self, len: usize) {
        self.out_buffer_write_len = len;
    }

    /// Read a frame from the provided stream.
    pub(super) fn read_frame(
        &mut self,
        stream: &mut impl Read,
        max_size: Option<usize>,
        unmask: bool,
        accept_unmasked: bool,
    ) -> Result<Option<Frame>> {
        let max_size = max_size.unwrap_or_else(usize::max_value);

        let mut payload = loop {
            if self.header.is_none() {
                let mut cursor = Cursor::new(&mut self.in_buffer);
                self.header = FrameHeader::parse(&mut cursor)?;
                let advanced = cursor.position();
                bytes::Buf::advance(&mut self.in_buffer, advanced as _);

                if let Some((_, len)) = &self.header {
                    // Enforce frame size limit early. Compare in u64 before
                    // narrowing so a length above usize::MAX can't wrap on
                    // 32-bit/wasm32 targets and slip past the check.
                    if *len > max_size as u64 {
                        return Err(Error::Capacity(CapacityError::MessageTooLong {
                            size: *len as usize,
                            max_size,
                        }));
                    }
                    // wsgate patch: nothing is reserved for the declared length here; the
                    // buffer grows as the payload arrives (below), so a 15-byte header cannot
                    // reserve `max_frame_size` bytes of address space.
                } else if self.in_buffer.capacity() == 0 {
                    // wsgate patch: a released buffer stays released until bytes arrive
                    // (`read_in` reads them through a per-thread scratch buffer); a bare
                    // `reserve` allocated exactly the header size, so every burst after an
                    // idle moment cost a 14-byte read before the real one.
                } else {
                    self.in_buffer.reserve(FrameHeader::MAX_SIZE);
                }
            }

            if let Some((_, len)) = &self.header {
                let len = *len as usize;
                if len <= self.in_buffer.len() {
                    break self.in_buffer.split_to(len);
                }
            }

            // Not enough data in buffer.
            // wsgate patch: room for the next read only (at most the read size), not for the
            // whole declared frame.
            if self.in_buffer.capacity() == 0 {
                // wsgate patch: the buffer was released while the socket idled. A read that
                // would block must not allocate it again (an idle socket waits here), so the
                // bytes go through a per-thread scratch buffer first and the buffer is
                // allocated, at a full read's size, only when some arrived.
                if self.read_released(stream)? == 0 {
                    trace!("no frame received");
                    return Ok(None);
                }
                continue;
            }
            let want = match &self.header {
                Some((_, len)) => (*len as usize)
                    .saturating_sub(self.in_buffer.len())
                    .min(self.in_buf_max_read.max(FrameHeader::MAX_SIZE))
                    .max(1),
                None => FrameHeader::MAX_SIZE,
            };
            if self.in_buffer.capacity() - self.in_buffer.len() < want {
                // wsgate patch: room for a full read, not just the bytes still missing (bytes'
                // `reserve` can leave exactly `want` spare, which made the next reads tiny).
                self.in_buffer.reserve(want.max(self.in_buf_max_read));
            }
            if self.read_in(stream)? == 0 {
                trace!("no frame received");
                return Ok(None);
            }
        };

        let (mut header, length) = self.header.take().expect("Bug: no frame header");
        debug_assert_eq!(payload.len() as u64, length);

        if unmask {
            if let Some(mask) = header.mask.take() {
                // A server MUST remove masking for data frames received from a client
                // as described in Section 5.3. (RFC 6455)
                apply_mask(&mut payload, mask);
            } else if !accept_unmasked {
                // The server MUST close the connection upon receiving a
                // frame that is not masked. (RFC 6455)
                // The only exception here is if the user explicitly accepts given
                // stream by setting WebSocketConfig.accept_unmasked_frames to true
                return Err(Error::Protocol(ProtocolError::UnmaskedFrameFromClient));
            }
        }

        if self.in_buffer.is_empty() {
            // wsgate patch: nothing buffered beyond this frame: release the read buffer, so an
            // idle socket holds none (it is allocated again at the next read).
            self.in_buffer = BytesMut::new();
        }
        let frame = Frame::from_payload(header, payload.freeze());
        trace!("received frame {frame}");
        Ok(Some(frame))
    }

    /// wsgate patch: one read while `in_buffer` is released, through a per-thread scratch
    /// buffer of a full read's size; `in_buffer` is allocated (a full read's size, or the
    /// bytes read if more) only when bytes arrived, so a read that would block allocates
    /// nothing.
    fn read_released(&mut self, stream: &mut impl Read) -> io::Result<usize> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let read_size = self.in_buf_max_read.max(FrameHeader::MAX_SIZE);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            if scratch.len() < read_size {
                scratch.resize(read_size, 0);
            }
            let n = stream.read(&mut scratch[..read_size])?;
            if n > 0 {
                let mut fresh = BytesMut::with_capacity(read_size);
                fresh.extend_from_slice(&scratch[..n]);
                self.in_buffer = fresh;
            }
            Ok(n)
        })
    }

    /// wsgate patch: makes sure some bytes are buffered, reading the stream once (as
    /// `read_frame` would) only when none are, and decodes nothing: a caller can then take a
    /// run that starts at the read's first frame (`take_text_run`) before any frame is
    /// decoded. `Ok(true)` when bytes are buffered; `Ok(false)` when `read_frame` has to take
    /// over (a frame header is already decoded, or the stream ended). A read that would block
    /// returns its error.
    pub(super) fn fill(&mut self, stream: &mut impl Read) -> Result<bool> {
        if self.header.is_some() {
            return Ok(false);
        }
        if !self.in_buffer.is_empty() {
            // A frame the last read cut in two is completed by one more read here, so that
            // the run starts with it (decoding it alone, then the rest as a run, cost a
            // decode, an encode and a second copy into the client's buffer per read).
            if raw_frame_len(&self.in_buffer).is_some_and(|n| n <= self.in_buffer.len() as u64) {
                return Ok(true);
            }
            // Room for a read's size in all while the cut frame is short: the buffer's own
            // allocation then takes it (the frame moved to its front) instead of a new one
            // per read. A longer remainder gets a full read's room beyond it.
            let len = self.in_buffer.len();
            let want = if len < self.in_buf_max_read / 2 {
                self.in_buf_max_read - len
            } else {
                self.in_buf_max_read
            };
            if self.in_buffer.capacity() - len < want {
                self.in_buffer.reserve(want);
            }
            return Ok(self.read_in(stream)? > 0);
        }
        let n = if self.in_buffer.capacity() == 0 {
            self.read_released(stream)?
        } else {
            self.read_in(stream)?
        };
        Ok(n > 0)
    }

    /// wsgate patch: takes a run of frames from the bytes already buffered (no I/O): complete,
    /// final, unmasked text frames with no reserved bits, each payload at most `max_size`
    /// bytes and accepted by `filter`, at most `max_frames` of them, of which `filter` keeps
    /// the first [`keep`](crate::protocol::RunFilter::keep). The run stops at the first frame
    /// that is anything else (it stays buffered for `read_frame`, as do frames not kept).
    /// Returns the frames' raw bytes (headers included); `payloads` gets each payload's range
    /// in them.
    pub(super) fn take_text_run(
        &mut self,
        max_frames: usize,
        max_size: usize,
        filter: &mut dyn crate::protocol::RunFilter,
        payloads: &mut Vec<std::ops::Range<usize>>,
    ) -> Option<bytes::Bytes> {
        payloads.clear();
        if self.header.is_some() {
            return None;
        }
        let buf = &self.in_buffer[..];
        let mut pos = 0;
        while payloads.len() < max_frames {
            // Read straight off the bytes: a plain text frame's first byte is 0x81 (final,
            // no reserved bits, text) and its mask bit is clear.
            let head = &buf[pos..];
            if head.first() != Some(&0x81) || head.get(1).is_none_or(|b| b & 0x80 != 0) {
                break;
            }
            let Some((header_len, len)) = raw_header(head) else {
                break;
            };
            if len > max_size as u64 {
                break;
            }
            let start = pos + header_len;
            let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else {
                break;
            };
            if end > buf.len() || !filter.accept(&buf[start..end]) {
                break;
            }
            if payloads.capacity() == 0 {
                // One allocation for the run's ranges (a full batch of 64 by default, which a
                // read of deltas nearly fills), made only once a run exists (growing
                // from empty took three; reserving up front cost one per read with no run).
                payloads.reserve(max_frames.min(64));
            }
            payloads.push(start..end);
            pos = end;
        }
        // The filter may keep fewer than it accepted (a decision that needs the whole run);
        // the frames it leaves stay buffered.
        let keep = filter.keep(payloads.len()).min(payloads.len());
        payloads.truncate(keep);
        let Some(last) = payloads.last() else {
            return None;
        };
        let pos = last.end;
        let run = self.in_buffer.split_to(pos).freeze();
        if self.in_buffer.is_empty() {
            // As in `read_frame`: an empty buffer is released.
            self.in_buffer = BytesMut::new();
        }
        Some(run)
    }

    /// wsgate patch: queues already-encoded frames (see `take_text_run`), like `buffer_frame`.
    pub(super) fn buffer_raw<Stream>(&mut self, stream: &mut Stream, frames: &[u8]) -> Result<()>
    where
        Stream: Write,
    {
        if frames.len() + self.out_buffer.len() > self.max_out_buffer_len {
            return Err(Error::WriteBufferFull(Box::new(Message::Binary(
                bytes::Bytes::copy_from_slice(frames),
            ))));
        }
        // A buffer allocated here has room for the batching target beyond these frames: a
        // run that stays under the target is followed by another before the write, which
        // would otherwise grow (and copy) the buffer once per write.
        let want = if self.out_buffer.capacity() == 0 {
            frames.len() + self.out_buffer_write_len.min(64 << 10)
        } else {
            frames.len()
        };
        self.out_buffer.reserve(want);
        self.out_buffer.extend_from_slice(frames);
        if self.out_buffer.len() > self.out_buffer_write_len {
            self.write_out_buffer(stream)
        } else {
            Ok(())
        }
    }

    /// Read into available `in_buffer` capacity.
    fn read_in(&mut self, stream: &mut impl Read) -> io::Result<usize> {
        let len = self.in_buffer.len();
        debug_assert!(self.in_buffer.capacity() > len);
        self.in_buffer.resize(self.in_buffer.capacity().min(len + self.in_buf_max_read), 0);
        let size = stream.read(&mut self.in_buffer[len..]);
        self.in_buffer.truncate(len + size.as_ref().copied().unwrap_or(0));
        size
    }

    /// Writes a frame into the `out_buffer`.
    /// If the out buffer size is over the `out_buffer_write_len` will also write
    /// the out buffer into the provided `stream`.
    ///
    /// To ensure buffered frames are written call [`Self::write_out_buffer`].
    ///
    /// May write to the stream, will **not** flush.
    pub(super) fn buffer_frame<Stream>(&mut self, stream: &mut Stream, frame: Frame) -> Result<()>
    where
        Stream: Write,
    {
        if frame.len() + self.out_buffer.len() > self.max_out_buffer_len {
            return Err(Error::WriteBufferFull(Message::Frame(frame).into()));
        }

        trace!("writing frame {frame}");

        // wsgate patch: a released (empty) buffer is allocated once at the batching size, not
        // grown frame by frame.
        let want = if self.out_buffer.capacity() == 0 {
            frame.len().max(self.out_buffer_write_len.min(64 << 10))
        } else {
            frame.len()
        };
        self.out_buffer.reserve(want);
        frame.format_into_buf(&mut self.out_buffer).expect("Bug: can't write to vector");

        if self.out_buffer.len() > self.out_buffer_write_len {
            self.write_out_buffer(stream)
        } else {
            Ok(())
        }
    }

    /// Writes the out_buffer to the provided stream.
    ///
    /// Does **not** flush.
    pub(super) fn write_out_buffer<Stream>(&mut self, stream: &mut Stream) -> Result<()>
    where
        Stream: Write,
    {
        while !self.out_buffer.is_empty() {
            let len = stream.write(&self.out_buffer)?;
            if len == 0 {
                // This is the same as "Connection reset by peer"
                return Err(IoError::new(
                    IoErrorKind::ConnectionReset,
                    "Connection reset while sending",
                )
                .into());
            }
            self.out_buffer.drain(0..len);
        }
        // wsgate patch: everything was written: release the write buffer, so an idle socket
        // holds none.
        self.out_buffer = Vec::new();

        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use crate::error::{CapacityError, Error};

    use super::{Frame, FrameSocket};

    use std::io::Cursor;

    #[test]
    fn read_frames() {
        env_logger::init();

        let raw = Cursor::new(vec![
            0x82, 0x07, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x82, 0x03, 0x03, 0x02, 0x01,
            0x99,
        ]);
        let mut sock = FrameSocket::new(raw);

        assert_eq!(
            sock.read(None).unwrap().unwrap().into_payload(),
            &[0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07][..]
        );
        assert_eq!(sock.read(None).unwrap().unwrap().into_payload(), &[0x03, 0x02, 0x01][..]);
        assert!(sock.read(None).unwrap().is_none());

        let (_, rest) = sock.into_inner();
        assert_eq!(rest, vec![0x99]);
    }

    #[test]
    fn from_partially_read() {
        let raw = Cursor::new(vec![0x02, 0x03, 0x04, 0x05, 0x06, 0x07]);
        let mut sock = FrameSocket::from_partially_read(raw, vec![0x82, 0x07, 0x01]);
        assert_eq!(
            sock.read(None).unwrap().unwrap().into_payload(),
            &[0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07][..]
        );
    }

    #[test]
    fn write_frames() {
        let mut sock = FrameSocket::new(Vec::new());

        let frame = Frame::ping(vec![0x04, 0x05]);
        sock.send(frame).unwrap();

        let frame = Frame::pong(vec![0x01]);
        sock.send(frame).unwrap();

        let (buf, _) = sock.into_inner();
        assert_eq!(buf, vec![0x89, 0x02, 0x04, 0x05, 0x8a, 0x01, 0x01]);
    }

    #[test]
    fn parse_overflow() {
        let raw = Cursor::new(vec![
            0x83, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00,
        ]);
        let mut sock = FrameSocket::new(raw);
        let _ = sock.read(None); // should not crash
    }

    #[test]
    fn size_limit_hit() {
        let raw = Cursor::new(vec![0x82, 0x07, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07]);
        let mut sock = FrameSocket::new(raw);
        assert!(matches!(
            sock.read(Some(5)),
            Err(Error::Capacity(CapacityError::MessageTooLong { size: 7, max_size: 5 }))
        ));
    }

    #[test]
    #[cfg(target_pointer_width = "32")]
    fn length_above_usize_max_rejected() {
        // 64-bit payload length 0x1_0000_0005 does not fit a 32-bit usize; it
        // must be rejected rather than wrapping to 5 when narrowed.
        let raw = Cursor::new(vec![0x82, 0x7f, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x05]);
        let mut sock = FrameSocket::new(raw);
        assert!(matches!(
            sock.read(None),
            Err(Error::Capacity(CapacityError::MessageTooLong { size: 5, max_size: usize::MAX }))
        ));
    }
}
