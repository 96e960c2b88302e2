# The agent protocol's vocabulary: its one definition.
#
# The master imports it (workers_app.protocol, tasks_app.validators). The
# agent must stay a single standard-library file, so workers_app/agent.py
# carries a verbatim copy of this file between its "wire vocabulary" markers:
# `make wire` writes the copy, and tests/test_protocol.py fails when the two
# differ. Keep this file free of imports and of anything but the vocabulary.

# 1: one JSON object per websocket message.
# 2: a message may also be a JSON array of frames, handled in order; the side
#    that sends them batches whatever is ready, the other applies them together.
PROTOCOL_VERSION = 2
SUPPORTED_PROTOCOLS = (1, 2)

# Largest websocket message by default; the master's own limit is in its welcome.
MAX_FRAME_BYTES = 1024 * 1024
# Most frames one message may carry; a receiver refuses more.
MAX_FRAMES_PER_MESSAGE = 1000
# Largest `data` of one log frame, in characters.
MAX_LOG_DATA = 512 * 1024
MIN_CAPACITY, MAX_CAPACITY = 1, 1024
# A label, as a worker carries it and a task requires it.
LABEL_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
MAX_LABELS = 32
STREAMS = ("stdout", "stderr")
# "lost": the agent gave the attempt up (drain timeout, self-fencing); it is retried.
RESULT_STATUSES = ("succeeded", "failed", "timed_out", "cancelled", "lost")

# Close codes in the private range (RFC 6455 section 7.4.2: 4000-4999).
CLOSE_BAD_CREDENTIAL = 4401
CLOSE_REVOKED = 4403
# Silent for longer than the lost timeout while the socket stayed open.
CLOSE_SILENT = 4408
# A newer connection of the same worker said hello: only one may serve it.
CLOSE_REPLACED = 4409
# RFC 6455 7.4.1: 1013 "try again later", a transient failure of the master.
CLOSE_TRY_AGAIN = 1013

# Largest magnitude of a number in a frame: the largest float. Python's JSON
# parser also takes NaN, infinities and integers of any size, which neither
# side can compute with (NaN fails the comparison too). Each side's own ranges
# are checked after this.
MAX_NUMBER = 1.7976931348623157e308

_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_BOOL = (bool,)
_LIST = (list,)
_NONE = (type(None),)

# Frames by type: {field: (allowed JSON types, required)}. A bool never counts
# as a number, even though Python says it is one.
AGENT_FRAMES = {
    "hello": {
        "protocol": (_INT, True),
        "agent_version": (_STR, False),
        "hostname": (_STR, False),
        "name": (_STR, False),
        "capacity": (_INT, True),
        "labels": (_LIST, False),
        "running": (_LIST, True),
        # Finished while disconnected, result spooled and about to be replayed.
        "spooled": (_LIST, False),
        "draining": (_BOOL, False),
    },
    "accepted": {"attempt": (_INT, True)},
    "rejected": {"attempt": (_INT, True), "reason": (_STR, False)},
    "started": {
        "attempt": (_INT, True),
        "pid": (_INT + _NONE, False),
        "started_at": (_NUM, False),
    },
    "log": {
        "attempt": (_INT, True),
        "seq": (_INT, True),
        "stream": (_STR, True),
        "data": (_STR, True),
    },
    "finished": {
        "attempt": (_INT, True),
        "status": (_STR, True),
        "exit_code": (_INT + _NONE, True),
        "reason": (_STR, False),
        "started_at": (_NUM + _NONE, False),
        "finished_at": (_NUM + _NONE, False),
        "output_bytes": (_INT, False),
        "truncated": (_BOOL, False),
        "last_seq": (_INT, False),
    },
    "heartbeat": {"running": (_LIST, False), "draining": (_BOOL, False)},
}

MASTER_FRAMES = {
    "welcome": {
        "protocol": (_INT, True),
        "worker_id": (_INT, True),
        "name": (_STR, True),
        "heartbeat_s": (_NUM, True),
        "log_limit_bytes": (_INT, True),
        "max_frame_bytes": (_INT, True),
        "lost_after_s": (_NUM, True),
        "fence_after_s": (_NUM + _NONE, True),
    },
    "assign": {
        "attempt": (_INT, True),
        "run": (_INT, True),
        "task_name": (_STR, True),
        "argv": (_LIST + _NONE, True),
        "shell": (_STR + _NONE, True),
        "env": ((dict,), True),
        # Variables the command gets after env, whose values the agent masks
        # (***) in the output it sends. An agent that predates them runs the
        # command without them: upgrade agents before giving tasks secrets.
        "secret_env": ((dict,), False),
        "cwd": (_STR + _NONE, True),
        "timeout": (_NUM + _NONE, True),
        "shard_index": (_INT, True),
        "shard_count": (_INT, True),
        # A merge (fan-in) attempt: argv and shell are both null, so an agent
        # that predates merges refuses it ("exactly one of argv and shell")
        # instead of running the command without its inputs. The command is
        # here ({"argv", "shell"}, one of them set), with "outputs": the path
        # (on the master) whose GET streams every shard's stdout in shard
        # order, each framed as a line "<index> <byte length>" and its bytes.
        "merge": ((dict,) + _NONE, False),
    },
    "cancel": {"attempt": (_INT, True)},
    # The result of this attempt is stored: the agent may forget it.
    "ack": {"attempt": (_INT, True)},
    # Output of this attempt up to seq is stored.
    "log_ack": {"attempt": (_INT, True), "seq": (_INT, True)},
    "drain": {},
    "resume": {},
    "error": {"code": (_STR, True), "message": (_STR, True), "attempt": (_INT, False)},
}


def field_problem(frame, schemas):
    """(code, message) for what is wrong with a decoded frame's type and fields, or None."""
    if not isinstance(frame, dict):
        return "malformed", "frame must be a JSON object"
    kind = frame.get("type")
    # A list or object as the type is unhashable: `in` would raise TypeError.
    if not isinstance(kind, str) or kind not in schemas:
        return "unknown_type", f"unknown frame type {kind!r}"
    for name, (types, required) in schemas[kind].items():
        if name not in frame:
            if required:
                return "malformed", f"{kind}: missing field {name!r}"
            continue
        value = frame[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return "malformed", f"{kind}: field {name!r} has the wrong type"
        if isinstance(value, (int, float)) and not -MAX_NUMBER <= value <= MAX_NUMBER:
            return "malformed", f"{kind}: field {name!r} is not a finite number"
    if not valid_text(frame):
        return "malformed", f"{kind}: text is not valid Unicode"
    return None


def valid_text(value):
    """False if a string anywhere in value holds a lone surrogate: JSON escapes
    let one in, and no database, file or socket takes it as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return False
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, dict):
            stack += item
            stack += item.values()
    return True


def pack(texts, protocol, max_bytes):
    """The websocket messages that carry these encoded frames, in order, each
    with its frame count. Protocol 1: one frame per message. Protocol 2: JSON
    arrays of at most max_bytes (UTF-8) and MAX_FRAMES_PER_MESSAGE frames; a
    frame bigger than max_bytes still goes, alone, for the receiver to refuse."""
    if protocol < 2:
        return [(text, 1) for text in texts]
    messages, batch, size = [], [], 1  # "[" and "]", and a "," before all but the first
    for text in texts:
        length = len(text) if text.isascii() else len(text.encode())
        if batch and (size + length + 1 > max_bytes or len(batch) >= MAX_FRAMES_PER_MESSAGE):
            messages.append((_array(batch), len(batch)))
            batch, size = [], 1
        batch.append(text)
        size += length + 1
    if batch:
        messages.append((_array(batch), len(batch)))
    return messages


def _array(texts):
    return texts[0] if len(texts) == 1 else "[" + ",".join(texts) + "]"
