"""Pub/sub messages framed here, their large payloads read straight into a buffer of their own.

Owns the one way bytes on a subscriber connection may bypass the reply parser. A reply parser
copies every byte twice (into its buffer as it is fed, then out into the bytes object it
returns): for a body piece of half a megabyte that is most of what receiving it costs in
Python. ``DirectReads`` (the ``ReplyParser`` contract) frames the message pushes of one kind
(``message``, or ``smessage``) itself: a small payload is copied once out of the read, and a
payload of at least ``direct_from`` bytes is read by the socket straight into a bytearray of
its size (``read_into``/``filled``, which ``ReplyReader`` offers the transport) and delivered
as a memoryview of it. Replies come out in stream order. The bytearray is used again for a
later payload once no view of it is left (its consumer is done with it): a new one per payload
costs a fill with zeros and, past the allocator's threshold, page faults on every use.

Between payloads, a read may go into such a free buffer whole (``read_ahead``/``ahead_filled``)
instead of the connection's own small one: a push whose header and payload it holds, the usual
case once a sender writes each piece in one go, is then delivered from where it was read, in
one read and with no copy; one whose payload the read cut goes on being read in place. Without
it, each large payload took two reads (its header with the start of the payload, copied out,
then the rest): two system calls and two turns of the event loop. Two buffers are kept, so
that a read holding the end of one payload and the start of the next needs no new one.

A payload's last bytes may also be read apart, by the socket straight into a ``bytes`` object
of their own, when the owner says where they start (``tail_size``: for a body piece, the body,
which then reaches its consumer with no copy at all; an ASGI body must be ``bytes``, which a
buffer of ours cannot become without a copy). After a large payload (``streaming``), the
connection peeks at the start of the next read (``plan_split``): a push of this kind whose
header and payload start it holds whole, with a tail of at least ``direct_from`` bytes, has
its header and payload start read alone (``split_taken``), then its tail read by ``recv`` of
exactly what remains (``tail_wanted``/``tail_read``); the push is delivered as a
``SplitPayload``. A tail the socket hands over in several reads is joined once (the copy a
buffer would have cost); one the connection's own read took (no socket of ours: TLS, uvloop)
is copied out of it.

Every other reply (a subscription's confirmation, a PONG, an error, a header that does not
fit) goes to a ``PythonParser``, which hands back the bytes after it (``take_rest``): where a
reply starts is always known. A push cut by the end of a read is kept (at most a header and a
small payload) until the rest comes. The replies are the same as the parser's alone.

Must never reorder or alter a reply, nor allocate past its bounds: a payload over
``direct_max`` takes the parser's path (which bounds the reply size), a channel name over 4 KiB
too, and a payload not followed by CRLF raises ``ProtocolError``.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import Any, Final

from .protocol import DEFAULT_MAX_REPLY_SIZE, NEED_DATA, ProtocolError, PythonParser

__all__ = ["DIRECT_FROM", "DIRECT_MAX", "DirectReads", "SplitPayload", "TailSize"]

DIRECT_FROM: Final = 64 * 1024
"""Payloads from this size are read straight into their own buffer."""
DIRECT_MAX: Final = 8 * 1024 * 1024
"""Larger payloads go through the parser: a buffer is allocated whole on the word of a header,
so its size is bounded before any of it arrived."""

_LENGTH = re.compile(rb"([0-9]{1,10})\r\n")
_PARTIAL_LENGTH = re.compile(rb"[0-9]{0,10}\r?")
_MAX_CHANNEL: Final = 4096  # a push naming a longer channel is left to the parser
_CUT: Final = object()  # a push cut by the end of a read
_SLICE: Final = 64 * 1024  # what the parser is fed at a time: it gives back what follows a reply
_SMALL_READ: Final = 16 * 1024  # a read of small pushes, copied to bytes to be framed
_KEEP_MAX: Final = 2 * 1024 * 1024  # a payload buffer kept for reuse at most (a larger is rare)
_KEPT: Final = 2  # payload buffers kept for reuse
# Room past a payload in its buffer for the header of a push read ahead into it (the header
# regex's bound on the channel, and the lengths).
_HEADER_ROOM: Final = _MAX_CHANNEL + 64


TailSize = Callable[[memoryview, int], int]
"""Given the start of a payload (after its push header) and the payload's size, how many of
its last bytes to read apart (0: none). A hint: whoever decodes the payload checks it."""


class SplitPayload:
    """A payload read in two: ``head``, then ``tail``, its last bytes, read into a ``bytes``
    object of their own. Indexes and measures as their concatenation would."""

    __slots__ = ("head", "tail")

    def __init__(self, head: bytes, tail: bytes) -> None:
        self.head = head
        self.tail = tail

    def __len__(self) -> int:
        return len(self.head) + len(self.tail)

    def __getitem__(self, index: int) -> int:
        if type(index) is not int:
            raise TypeError("a split payload is indexed by int only")
        if index < 0:
            index += len(self)
        head = self.head
        if 0 <= index < len(head):
            return head[index]
        return self.tail[index - len(head)]

    def __bytes__(self) -> bytes:
        return self.head + self.tail

    def __repr__(self) -> str:
        return f"SplitPayload({len(self.head)} + {len(self.tail)} bytes)"


def _cut_length(data: Any, start: int, size: int) -> object:
    """``_CUT`` if what ``data`` holds from ``start`` may begin a length line, else None."""
    if size - start <= 11 and _PARTIAL_LENGTH.fullmatch(data, start, size):
        return _CUT
    return None


def _free(buffer: bytearray) -> bool:
    """Whether no view of ``buffer`` is left, so that it may be written again."""
    # A bytearray refuses to resize while a view of it exists (its consumer still holds the
    # payload it was given): then it must not be written again. Popping a byte checks
    # exactly that; appending it back cannot reallocate.
    try:
        last = buffer.pop()
    except BufferError:
        return False
    buffer.append(last)
    return True


class DirectReads:
    """A ``ReplyParser`` for a subscriber connection that frames ``kind`` pushes itself and
    reads their large payloads straight into a bytearray of their own, delivered as a
    memoryview of it."""

    def __init__(
        self,
        kind: bytes,
        *,
        direct_from: int = DIRECT_FROM,
        direct_max: int = DIRECT_MAX,
        max_reply_size: int = DEFAULT_MAX_REPLY_SIZE,
        tail_size: TailSize | None = None,
    ) -> None:
        # The pure-Python parser, whatever the connection's choice: it sees only the rare
        # replies framed nowhere else, and gives back what follows each (``take_rest``).
        self._parser = PythonParser(max_reply_size=max_reply_size)
        self._kind = kind
        self._prefix = b"*3\r\n$%d\r\n%b\r\n$" % (len(kind), kind)
        # The whole header in one match when the channel holds no CR (ours never do).
        self._header = re.compile(
            re.escape(self._prefix) + rb"([0-9]{1,4})\r\n([^\r]{0,4096})\r\n\$([0-9]{1,10})\r\n"
        )
        self._direct_from = direct_from
        self._direct_max = direct_max
        self._aligned = True  # the next byte starts a reply: the parser holds none of one
        self._ready: collections.deque[list[Any]] = collections.deque()  # framed here, in order
        self._target: memoryview | None = None  # where the payload being read goes, and its CRLF
        self._buffers: list[bytearray] = []  # the last payloads', to be used again
        self._ahead: bytearray | None = None  # the buffer ``read_ahead`` last offered
        self._filled = 0
        self._channel = b""
        self._pending = b""  # the start of a push cut by the end of a read
        self._tail_size = tail_size
        self.streaming = False
        """Whether the connection should peek before its next read (``plan_split``: the last
        push carried a large payload, and tails may be read apart) or read a tail
        (``tail_wanted``)."""
        self._plan: tuple[bytes, int, int, int] = (b"", 0, 0, 0)  # channel, start, end, tail
        # A tail being read: its first part as read (``bytes``, the tail itself when one
        # read took it whole), then one ``bytearray`` of all parts, so that a tail trickled
        # in many small reads costs its size, not an object per read.
        self._tail: bytes | bytearray | None = None
        self._tail_left = 0
        self._head = b""  # the payload before its tail
        self._whole_tail = b""  # a tail read whole, its CRLF still to come
        self._crlf = 0  # bytes of that CRLF still to come
        self._apart = False  # a tail or its CRLF under way (``_tail`` or ``_crlf``)

    def feed(self, data: Any) -> None:
        """Take bytes read into the connection's own buffer (a view valid during the call)."""
        if self._pending:  # a push cut by the end of the last read
            data = self._pending + bytes(data)
            self._pending = b""
        elif len(data) <= _SMALL_READ and type(data) is not bytes:
            data = bytes(data)  # cheaper to frame as bytes than through a view
        size = len(data)
        pos = 0
        while pos < size:
            if self._apart:  # a tail being read, or its CRLF
                if self._tail is not None:  # bytes of the tail the connection's read took
                    n = min(size - pos, self._tail_left)
                    self.tail_read(bytes(data[pos : pos + n]))
                    pos += n
                    continue
                if data[pos] != (13 if self._crlf == 2 else 10):
                    raise ProtocolError("bulk string not terminated by CRLF")
                pos += 1
                self._crlf -= 1
                if not self._crlf:
                    split = SplitPayload(self._head, self._whole_tail)
                    self._head = self._whole_tail = b""
                    self._ready.append([self._kind, self._channel, split])
                    self._apart = False
                    self.streaming = True
                continue
            target = self._target
            if target is not None:  # a read that did not go to ``read_into`` (TLS, a test)
                filled = self._filled
                n = min(size - pos, len(target) - filled)
                target[filled : filled + n] = memoryview(data)[pos : pos + n]
                self._filled = filled + n
                pos += n
                if self._filled == len(target):
                    self._finish()
                continue
            if self._aligned:
                found = self._push_at(data, pos, size)
                if found is _CUT:
                    self._pending = bytes(data[pos:size])
                    return
                if isinstance(found, tuple):
                    channel, length, start = found
                    if self._direct_from <= length <= self._direct_max:
                        self._channel = channel
                        self.streaming = False  # no peek while it is read: ``_finish``
                        self._target = self._buffer_for(length + 2)
                        self._filled = 0
                        pos = start
                        continue
                    if length < self._direct_from:
                        end = start + length
                        if end + 2 > size:  # a small push cut by the end of the read
                            self._pending = bytes(data[pos:size])
                            return
                        if data[end : end + 2] != b"\r\n":
                            raise ProtocolError("bulk string not terminated by CRLF")
                        self.streaming = False
                        payload = data[start:end]
                        if type(payload) is not bytes:
                            payload = bytes(payload)
                        self._ready.append([self._kind, channel, payload])
                        pos = end + 2
                        continue
            pos = self._parse(data, pos, size)

    def _parse(self, data: Any, pos: int, size: int) -> int:
        """Feed the parser from ``pos``, a slice at a time, until it returns a reply; return
        where framing resumes: after that reply, or ``size`` if the parser needs more."""
        parser = self._parser
        while pos < size:
            end = min(size, pos + _SLICE)
            parser.feed(data[pos:end])
            pos = end
            reply = parser.gets()
            if reply is not NEED_DATA:
                self.streaming = False
                self._ready.append(reply)
                self._aligned = True
                return pos - len(parser.take_rest())
        self._aligned = False
        return size

    def gets(self) -> Any:
        """The next complete reply (a large payload as a memoryview), or ``NEED_DATA``."""
        return self._ready.popleft() if self._ready else NEED_DATA

    def feed_gets(self, data: Any) -> Any:
        """``feed(data)``, then what ``gets()`` returns (a read's first step: one call less)."""
        self.feed(data)
        return self._ready.popleft() if self._ready else NEED_DATA

    def read_into(self) -> memoryview | None:
        """Where the next read should go: the rest of a payload being read, else None (the
        connection's own buffer, or ``read_ahead``)."""
        if self._target is None:
            return None
        return self._target[self._filled :]

    def read_ahead(self) -> memoryview | None:
        """Where a read between payloads may go instead of the connection's buffer: the
        whole of a free payload buffer (``ahead_filled`` takes the count), or None (no large
        payload seen yet, none free, or a reply or push under way)."""
        if (
            self._target is not None
            or self._pending
            or not self._aligned
            or self._tail is not None
            or self._crlf
        ):
            return None
        for buffer in self._buffers:
            if _free(buffer):
                self._ahead = buffer
                return memoryview(buffer)
        return None

    def ahead_filled(self, nbytes: int) -> None:
        """``nbytes`` were read into what ``read_ahead`` returned."""
        buffer = self._ahead
        assert buffer is not None
        self._ahead = None
        view = memoryview(buffer)
        found = self._push_at(buffer, 0, nbytes)
        if isinstance(found, tuple):
            channel, length, start = found
            end = start + length + 2
            if self._direct_from <= length <= self._direct_max and end <= len(buffer):
                # The payload stays where it was read: the rest of it, if the read cut it,
                # goes after it (``read_into``).
                self._channel = channel
                self.streaming = False  # no peek while it is read: ``_finish``
                self._target = view[start:end]
                self._filled = min(nbytes, end) - start
                if self._filled == len(self._target):
                    self._finish()
                    if nbytes > end:  # what follows it: framed as any read
                        self.feed(view[end:nbytes])
                return
        self.feed(view[:nbytes])

    def filled(self, nbytes: int) -> None:
        """``nbytes`` were read into what ``read_into`` returned."""
        assert self._target is not None
        self._filled += nbytes
        if self._filled == len(self._target):
            self._finish()

    @property
    def splits(self) -> bool:
        """Whether tails may be read apart (a ``tail_size`` was given)."""
        return self._tail_size is not None

    def plan_split(self, data: Any, size: int) -> int:
        """How many bytes to read before a tail, given ``data[:size]`` peeked at the start of
        the next read (``streaming``): the header and the payload's start of a push whose
        tail (``tail_size``, at least ``direct_from`` bytes) can be read apart, when ``data``
        holds them all; else 0 (read as usual). Nothing changes until ``split_taken``."""
        if (
            self._tail_size is None
            or self._target is not None
            or self._pending
            or not self._aligned
            or self._tail is not None
            or self._crlf
        ):
            return 0
        found = self._push_at(data, 0, size)
        if not isinstance(found, tuple):
            return 0
        channel, length, start = found
        if not self._direct_from <= length <= self._direct_max:
            return 0
        tail = int(self._tail_size(memoryview(data)[start:size], length))
        if not self._direct_from <= tail <= length:
            return 0
        end: int = start + length - tail
        if end > size:  # the payload's start was not all peeked
            return 0
        self._plan = (channel, start, end, tail)
        return end

    def split_taken(self, data: Any) -> None:
        """The bytes ``plan_split`` counted were read into ``data`` (its start): the tail
        comes next (``tail_wanted``)."""
        channel, start, end, tail = self._plan
        self._plan = (b"", 0, 0, 0)
        self._channel = channel
        self._head = bytes(data[start:end])
        self._tail = b""
        self._tail_left = tail
        self._apart = True

    def tail_wanted(self) -> int:
        """How many bytes of a tail are still to read (by ``recv``: ``tail_read``), or 0."""
        return self._tail_left if self._tail is not None else 0

    def tail_read(self, part: bytes) -> None:
        """``part``, the next bytes of the tail (at most ``tail_wanted``), were read."""
        tail = self._tail
        assert tail is not None and len(part) <= self._tail_left
        if not tail:
            tail = part  # kept as it is: the whole tail, if one read took it all
        elif type(tail) is bytes:
            tail = bytearray(tail)  # a second part: one buffer from now on
            tail += part
        else:
            tail += part
        self._tail = tail
        self._tail_left -= len(part)
        if not self._tail_left:
            self._tail = None
            self._whole_tail = tail if type(tail) is bytes else bytes(tail)
            self._crlf = 2
            self.streaming = False  # until the CRLF: nothing to peek at before it

    def _push_at(self, data: Any, pos: int, size: int) -> object:
        """``(channel, payload length, payload start)`` if a push of this kind starts at
        ``pos``; ``_CUT`` if ``data`` ends before its header does (consistent so far); None
        if none starts there (another reply: the parser's)."""
        match = self._header.match(data, pos, size)
        if match is not None:
            channel = match[2]
            if len(channel) == int(match[1]):
                return channel, int(match[3]), match.end()
        prefix = self._prefix
        end = pos + len(prefix)
        if end > size:
            return _CUT if prefix.startswith(bytes(data[pos:size])) else None
        if data[pos:end] != prefix:
            return None
        # Bounded by ``size``: ``data`` may be a reused buffer whose bytes past the read are
        # another message's, which must never be taken for this one's length.
        match = _LENGTH.match(data, end, size)
        if match is None:
            return _cut_length(data, end, size)
        channel_start = match.end()
        channel_length = int(match[1])
        if channel_length > _MAX_CHANNEL:
            return None
        channel_end = channel_start + channel_length
        if channel_end + 3 > size:
            return _CUT
        if data[channel_end : channel_end + 3] != b"\r\n$":
            return None
        match = _LENGTH.match(data, channel_end + 3, size)
        if match is None:
            return _cut_length(data, channel_end + 3, size)
        return bytes(data[channel_start:channel_end]), int(match[1]), match.end()

    def _buffer_for(self, size: int) -> memoryview:
        """A view of ``size`` bytes to read a payload into: of a kept buffer if one is large
        enough and no view of it is left, else of a new one (kept in place of the first held
        one: a held buffer stays its holder's, and is freed when they let go of it)."""
        buffers = self._buffers
        for buffer in buffers:
            if len(buffer) >= size and _free(buffer):
                return memoryview(buffer)[:size]
        buffer = bytearray(size + _HEADER_ROOM)
        if size <= _KEEP_MAX:
            held = [index for index, kept in enumerate(buffers) if not _free(kept)]
            if len(buffers) < _KEPT:
                buffers.append(buffer)
            else:  # all held, or too small: replace one held if any, else the smallest
                index = held[0] if held else min(range(len(buffers)), key=lambda i: len(buffers[i]))
                buffers[index] = buffer
        return memoryview(buffer)[:size]

    def _finish(self) -> None:
        target = self._target
        assert target is not None
        self._target = None
        if target[-2:].tobytes() != b"\r\n":
            raise ProtocolError("bulk string not terminated by CRLF")
        # A large payload read whole: the next read may start a push whose tail can be read
        # apart (a peek while one was being read into its buffer found nothing to plan).
        self.streaming = self._tail_size is not None
        self._ready.append([self._kind, self._channel, target[:-2]])
