"""A one-layer bidirectional ``nn.LSTM`` at inference, in numpy, for small batches
(the char BiLSTM's new word forms).

A batch of new word forms is a few dozen time steps over a handful of rows: torch's fixed
cost per op (and packing) is most of their time, numpy's is a fraction of it. Both
directions advance in the same ops (stacked weights), the backward one on rows
reversed within their length, so no packing is needed; the input projection of every
step is one matrix product before the loop (for char ids, a lookup in a table of the
projected embeddings). Same function as the torch layer, up to float rounding.
"""
import numpy
import torch
from torch import nn


class NumpyBiLSTM:
    """A snapshot of a ``batch_first`` bidirectional one-layer ``nn.LSTM``'s weights
    and of the embedding before it; rebuild it when they change."""

    def __init__(self, lstm: nn.LSTM, embed: nn.Embedding):
        if not lstm.bidirectional or lstm.num_layers != 1 or not lstm.bias or lstm.proj_size:
            raise ValueError("NumpyBiLSTM mirrors a one-layer bidirectional LSTM with biases")
        hidden = self.hidden = lstm.hidden_size
        # gate rows reordered to g, i, f, o (torch: i, f, g, o) and the sigmoid gates'
        # rows halved (exact): one tanh per step takes all four gates, as
        # sigmoid(x) = (1 + tanh(x / 2)) / 2
        order = numpy.r_[2 * hidden:3 * hidden, 0:2 * hidden, 3 * hidden:4 * hidden]
        scale = numpy.full((4 * hidden, 1), 0.5, dtype=numpy.float32)
        scale[:hidden] = 1

        def weights(name: str) -> numpy.ndarray:  # (2, ..., 4H): forward, backward
            both = [getattr(lstm, f"{name}_l0{suffix}").detach().cpu().numpy() for suffix in ("", "_reverse")]
            return numpy.stack([(w.reshape(4 * hidden, -1)[order] * scale).T for w in both])

        self.w_hh = numpy.ascontiguousarray(weights("weight_hh"))  # (2, H, 4H)
        w_ih = weights("weight_ih")  # (2, I, 4H)
        bias = weights("bias_ih") + weights("bias_hh")  # (2, 1, 4H)
        # every char id's input projection: forward rows, then backward rows
        table = numpy.matmul(embed.weight.detach().cpu().numpy(), w_ih) + bias
        self.table = numpy.ascontiguousarray(table.reshape(-1, 4 * hidden))

    def final_states(self, ids: numpy.ndarray, lengths: numpy.ndarray) -> numpy.ndarray:
        """(N, L) right-padded ids of N sequences with lengths >= 1 -> (N, 2H) final
        states, forward then backward, as ``torch.cat([h_n[0], h_n[1]], -1)`` of the
        packed sequences."""
        rows = numpy.arange(len(lengths))
        steps = numpy.arange(int(lengths.max()))
        backward = ids[rows[:, None], numpy.maximum(lengths[:, None] - 1 - steps, 0)]
        # (L, 2, N): step, direction, row; backward ids index the table's second half
        table_rows = numpy.stack([ids[:, :len(steps)].T, backward.T + len(self.table) // 2], axis=1)
        states = self._run(self.table[table_rows])  # (L, 2, N, H); past its length a row is ignored
        return states[lengths - 1, :, rows].reshape(len(rows), 2 * self.hidden)

    def _run(self, gates_in: numpy.ndarray) -> numpy.ndarray:
        """(L, 2, N, 4H) input gates (backward rows already reversed) -> (L, 2, N, H)
        hidden states."""
        steps, _, rows, _ = gates_in.shape
        hidden = self.hidden
        out = numpy.empty((steps, 2, rows, hidden), dtype=numpy.float32)
        h = numpy.zeros((2, rows, hidden), dtype=numpy.float32)
        c = numpy.zeros((2, rows, hidden), dtype=numpy.float32)
        gates = numpy.empty((2, rows, 4 * hidden), dtype=numpy.float32)
        scratch = numpy.empty((2, rows, hidden), dtype=numpy.float32)
        cell_in, sigmoids = gates[..., :hidden], gates[..., hidden:]
        in_gate, forget, out_gate = (gates[..., k * hidden:(k + 1) * hidden] for k in range(1, 4))
        for step in range(steps):
            numpy.matmul(h, self.w_hh, out=gates)
            gates += gates_in[step]
            numpy.tanh(gates, out=gates)
            sigmoids *= 0.5
            sigmoids += 0.5
            c *= forget
            numpy.multiply(in_gate, cell_in, out=scratch)
            c += scratch
            numpy.tanh(c, out=scratch)
            h = out[step]
            numpy.multiply(out_gate, scratch, out=h)
        return out


def fingerprint(*modules: nn.Module) -> tuple:
    """Changes when a parameter of ``modules`` (their own, not their children's) is
    replaced, rebound or changed in place by torch (thinc's optimizer writes through
    numpy, unseen: its caller clears caches)."""
    return tuple((p.data_ptr(), p._version) for m in modules for p in m._parameters.values() if p is not None)


def numpy_ready(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can go to numpy and back for free (CPU float32)."""
    return tensor.device.type == "cpu" and tensor.dtype == torch.float32
