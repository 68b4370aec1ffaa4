"""Exactly what leaves the device: captured on the wire to a real server."""

from __future__ import annotations

import pytest

from pocketllm.split.client import device_step

from .harness import Proxy, run_session, side_config


def _varints(ids) -> bytes:
    out = bytearray()
    for v in ids:
        while True:
            b, v = v & 0x7F, v >> 7
            out.append(b | (0x80 if v else 0))
            if not v:
                break
    return bytes(out)


def _token_encodings(ids: list[int]) -> list[bytes]:
    """Ways a run of token ids could be serialized: int16/32/64 little-endian, varints."""
    import numpy as np
    return [np.asarray(ids, dtype=t).tobytes() for t in ("<i2", "<i4", "<i8")] + [_varints(ids)]


@pytest.mark.parametrize("private", [True, False])
def test_wire_content(server, token_file, device, private):
    model, tok, records, batcher = device
    steps = 2
    proxy = Proxy(server.port)
    try:
        run_session(proxy.address, token_file, device, side_config(model, private=private), steps)
    finally:
        proxy.close()
    wire = bytes(proxy.upstream)
    assert len(wire) > 1000  # the activations did go through the proxy
    for s in range(steps):
        batch = batcher(s)
        msg = device_step(model, batch, side_config(model, private=private), s + 1).msg
        # the message holds quantized hidden states; targets only when labels are not private
        assert bool(msg.targets) == (not private) and msg.HasField("final") == (not private)
        for i in batcher.indices(s):
            text = records[i]["prompt"]
            for k in range(0, len(text) - 12, 12):   # no 12-byte window of the text
                assert text[k:k + 12].encode() not in wire, text[k:k + 12]
        for row, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            ids = row[mask.bool()].tolist()
            n_prompt = len(ids) - int((labels != -100).sum())
            for k in range(0, max(n_prompt - 6, 0), 6):  # no run of 6 input ids, any encoding
                for enc in _token_encodings(ids[k:k + 6]):
                    assert enc not in wire
