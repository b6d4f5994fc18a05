"""CaptionModel: frames -> CNN per frame -> temporal LSTM + cell memory -> attentive LSTM decoder.

The CNN runs on every frame (the TimeDistributed pattern); an LSTM reads the frame embeddings in
order, so motion and order matter (LRCN, Donahue et al. 2015). The clip embedding conditions a
Show-and-Tell decoder (Vinyals et al. 2015) through its initial state, and is also fed beside each
word (LRCN's "factored" input), which keeps small models from forgetting the picture. The
decoder also attends over the frames' grid cells (Show, Attend and Tell, Xu et al. 2015), which is
how it binds each colour to its shape, and finds which object moved.
An image is a sequence of one frame. The loss lives in ``training.py``, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.config import ModelConfig
from captioner.domain import DomainSummary
from captioner.encoder import ImageEncoder, load_pretrained_weights
from captioner.memory import CaptionMemory

DecoderState = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (1, N, H)
COPY_SCALE = 5.0  # the retrieval gate's softplus output is multiplied by this (see _predict)
# Largest word-gate table the decoder keeps (elements; 64 MB in float32): a 10,000-word
# vocabulary with 256 hidden units needs 10M. Larger ones compute each step's words instead.
MAX_GATE_TABLE = 1 << 24


@dataclass
class VisualContext:
    """What the decoder reads about each sequence: a summary vector and attention memory.

    ``summary`` (B, V) conditions the decoder's state and every step; ``keys`` and ``values``
    (B, M, D) are the grid cells it attends over, precomputed once so that decoding steps only
    compute queries. Rows index sequences, so a batch can be split or repeated for beams.

    Repeated for beams, the cells are not copied: ``beams`` consecutive rows share one row of
    ``keys`` and ``values``, and the decoder attends for all of a sequence's beams at once.
    """

    summary: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    words: torch.Tensor | None = None  # (B, V) retrieved neighbours' words, when the model has them
    # (B, 4H) the summary's share of the decoder LSTM's input gates: the same at every decoding
    # step, so CaptionDecoder.prepare computes it once per caption instead of once per word.
    summary_gates: torch.Tensor | None = None
    beams: int = 1  # rows per row of keys and values (see repeat_interleave)

    def __len__(self) -> int:
        return self.summary.shape[0]

    def _map(self, change: Callable[[torch.Tensor], torch.Tensor]) -> VisualContext:
        def optional(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else change(tensor)

        keys, values = self.keys, self.values
        if self.beams > 1:  # rows of a beam-repeated context: give each its own cells first
            keys, values = (t.repeat_interleave(self.beams, dim=0) for t in (keys, values))
        return VisualContext(
            change(self.summary),
            change(keys),
            change(values),
            optional(self.words),
            optional(self.summary_gates),
        )

    def __getitem__(self, rows: slice | torch.Tensor | list[int]) -> VisualContext:
        return self._map(lambda t: t[rows])

    @property
    def device(self) -> torch.device:
        return self.summary.device

    def repeat_interleave(self, repeats: int, dim: int = 0) -> VisualContext:
        """Each row ``repeats`` times in a row (one per beam).

        The cells are shared rather than copied. At batch 16 with 3 beams, copies made each
        step's attention read 4.8 MB instead of 1.6 MB and solve 192 small problems instead of
        64: beam search over 16 photos and scenes took 94-124 ms with copies and 72-101 ms
        shared (one CPU thread, 4 alternating runs), with the same captions.
        """
        if dim != 0:
            raise ValueError("a VisualContext repeats its rows (dim 0) only")
        return replace(
            self,
            summary=self.summary.repeat_interleave(repeats, dim=0),
            words=None if self.words is None else self.words.repeat_interleave(repeats, dim=0),
            summary_gates=None
            if self.summary_gates is None
            else self.summary_gates.repeat_interleave(repeats, dim=0),
            beams=self.beams * repeats,
        )


class FrameProjector(nn.Module):
    """One frame's grid features (..., M*C) -> normalised cells (..., M, C) and a frame
    embedding (..., frame_dim).

    Each stage's channels are normalised on their own (their scales differ by orders of
    magnitude). The frame embedding keeps the layout: every cell contributes a few channels in
    its place, beside the mean of all cells. It is kept cheap on purpose, since it runs on every
    frame; the wide per-cell projection runs once per sequence, in CellMemory.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        self.cells, self.channels = enc.cells, enc.cell_channels
        self.stage_channels = list(enc.stage_channels)
        # No affine parameters: the layers after learn their own scale, and with a frozen CNN
        # (features without gradient) the norms then need no backward pass, which halved this
        # module's training cost.
        self.stage_norms = nn.ModuleList(
            nn.LayerNorm(c, elementwise_affine=False) for c in self.stage_channels
        )
        self.squeeze = nn.Linear(self.channels, config.cell_summary_dim)
        self.mix = nn.Linear(self.cells * config.cell_summary_dim, config.frame_dim)
        self.pooled = nn.Linear(self.channels, config.frame_dim)
        self.act = nn.GELU()
        # Normalised frame embeddings keep the temporal LSTM's gates out of saturation.
        self.out_norm = nn.LayerNorm(config.frame_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = features.shape[:-1]
        grid = features.reshape(*lead, self.cells, self.channels)
        stages = grid.split(self.stage_channels, dim=-1)
        grid = torch.cat([norm(x) for norm, x in zip(self.stage_norms, stages, strict=True)], -1)
        layout = self.act(self.squeeze(grid)).flatten(-2)  # (..., M * cell_summary_dim)
        frame = self.act(self.mix(layout) + self.pooled(grid.mean(-2)))
        return grid, self.dropout(self.out_norm(frame))


class TemporalEncoder(nn.Module):
    """Frame embeddings (B, T, F) with lengths -> one visual embedding (B, V) per sequence.

    The LSTM reads each frame beside its change from the previous frame (zero for the first),
    as an RGB-difference stream does: motion is then in the input, not left to be inferred.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(2 * config.frame_dim, config.temporal_hidden, batch_first=True)
        # The visual embedding sees the LSTM's summary, the mean frame (what is there) and the
        # change from the first to the last frame (where it went, how its size changed).
        self.out = nn.Linear(config.temporal_hidden + 2 * config.frame_dim, config.visual_dim)
        # LayerNorm, not tanh: a saturated tanh here (measured: |v| averaged 0.94) stopped the
        # gradient that teaches the temporal LSTM motion.
        self.norm = nn.LayerNorm(config.visual_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        change = torch.cat([torch.zeros_like(frames[:, :1]), frames.diff(dim=1)], dim=1)
        steps = torch.cat([frames, change], dim=-1)  # (B, T, 2F)
        # Packing makes padded steps invisible: a clip's result does not depend on its batch-mates.
        packed = pack_padded_sequence(steps, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_last, _) = self.lstm(packed)  # (1, B, Ht): state after each sequence's last frame
        mean, displacement = masked_mean_and_change(frames, lengths)
        summary = torch.cat([h_last[0], mean, displacement], dim=-1)
        return self.dropout(self.norm(self.out(summary)))


class CellMemory(nn.Module):
    """Normalised cells (B, T, M, C) -> attention keys and values (B, M, cell_dim) per sequence.

    A cell's memory is its mean over the frames (what is there) and its change from the first
    frame to the last (what moved: a moving object leaves its start cells and fills its end
    cells, a still one changes nothing), so the decoder can look up the mover's colour and shape
    and tell it from a still object. For an image the change is zero. A learned position is
    added, so attention knows where each cell is (for "to the left of").
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        self.proj = nn.Linear(2 * enc.cell_channels, config.cell_dim)
        self.position = nn.Parameter(torch.randn(enc.cells, config.cell_dim) * 0.02)
        self.norm = nn.LayerNorm(config.cell_dim)
        self.keys = nn.Linear(config.cell_dim, config.cell_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, cells: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, change = masked_mean_and_change(cells, lengths)  # (B, M, C) each
        values = self.act(self.proj(torch.cat([mean, change], dim=-1)) + self.position)
        values = self.dropout(self.norm(values))
        return self.keys(values), values


class CaptionDecoder(nn.Module):
    """LSTM language model conditioned on a visual context, attending over its cells.

    Show-and-Tell conditioning (the summary sets the initial state and is fed beside every
    word) plus Luong-style attention (Luong et al. 2015): the LSTM's output queries the cells,
    and the word is predicted from both. The query comes after the LSTM, so teacher forcing
    runs the whole sequence in one LSTM call and one batched attention.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.attention_heads < 1 or config.cell_dim % config.attention_heads:
            raise ValueError(
                f"attention_heads ({config.attention_heads}) must be a positive divisor of "
                f"cell_dim ({config.cell_dim})"
            )
        self.heads = config.attention_heads
        # (weights' key, table): see _word_gate_table. A cache, not state: never saved.
        self._gate_table: tuple[tuple[object, ...], torch.Tensor] | None = None
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.init_h = nn.Linear(config.visual_dim, config.decoder_hidden)
        self.init_c = nn.Linear(config.visual_dim, config.decoder_hidden)
        self.lstm = nn.LSTM(
            config.word_dim + config.visual_dim, config.decoder_hidden, batch_first=True
        )
        self.query = nn.Linear(config.decoder_hidden, config.cell_dim)
        self.combine = nn.Linear(config.decoder_hidden + config.cell_dim, config.decoder_hidden)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.decoder_hidden, config.vocab_size)
        # Retrieval: how strongly each step adds the neighbours' words to its logits.
        self.copy_gate = nn.Linear(config.decoder_hidden, 1) if config.retrieval_k else None

    def init_state(self, visual: VisualContext) -> DecoderState:
        """Show-and-Tell conditioning: the picture sets the LSTM's initial state."""
        return (
            torch.tanh(self.init_h(visual.summary)).unsqueeze(0).contiguous(),
            torch.tanh(self.init_c(visual.summary)).unsqueeze(0).contiguous(),
        )

    def _predict(self, hidden: torch.Tensor, visual: VisualContext) -> torch.Tensor:
        """LSTM outputs (N, L, H) -> logits (N, L, vocab), attending over the cells."""
        n, steps = hidden.shape[:2]
        groups, beams = visual.keys.shape[0], visual.beams  # n = groups * beams
        if beams > 1 and steps != 1:
            raise ValueError("beams share their cells only one decoding step at a time")
        # One attention problem per sequence: its beams' queries are one query block.
        split = (groups, -1, self.heads, visual.keys.shape[-1] // self.heads)
        query = self.query(hidden).reshape(split).transpose(1, 2)  # (G, heads, beams*L, d)
        keys = visual.keys.reshape(split).transpose(1, 2)  # (G, heads, M, d)
        values = visual.values.reshape(split).transpose(1, 2)
        context = F.scaled_dot_product_attention(query, keys, values)  # (G, heads, beams*L, d)
        context = context.transpose(1, 2).reshape(n, steps, -1)  # (N, L, D)
        combined = torch.tanh(self.combine(torch.cat([hidden, context], dim=-1)))
        logits = self.head(self.dropout(combined))
        if self.copy_gate is not None and visual.words is not None:
            # A non-negative gate per step times the neighbours' word weights (at most 1 each):
            # the scale lets one step lift a retrieved word by up to several nats.
            gate = F.softplus(self.copy_gate(hidden)) * COPY_SCALE  # (N, L, 1)
            logits = logits + gate * visual.words.unsqueeze(1).to(logits.dtype)
        return logits

    def forward(self, tokens: torch.Tensor, visual: VisualContext) -> torch.Tensor:
        """Teacher forcing: tokens (B, L) -> logits (B, L, vocab), one step per input token."""
        words = self.embed(tokens)  # (B, L, W)
        summary = visual.summary.unsqueeze(1).expand(-1, tokens.shape[1], -1)
        inputs = torch.cat([words, summary], dim=-1)
        hidden, _ = self.lstm(self.dropout(inputs), self.init_state(visual))  # (B, L, H)
        return self._predict(self.dropout(hidden), visual)

    def prepare(self, visual: VisualContext) -> VisualContext:
        """``visual`` ready for ``step``: the summary's share of the input gates, computed once."""
        return replace(visual, summary_gates=F.linear(visual.summary, self._weights_ih()[1]))

    def step(
        self, tokens: torch.Tensor, state: DecoderState, visual: VisualContext
    ) -> tuple[torch.Tensor, DecoderState]:
        """One decoding step: tokens (N,) -> log-probabilities (N, vocab) and the next state.

        The LSTM cell is written out rather than called through nn.LSTM. Its input is the word
        beside the summary. The summary's share of the gates is the same at every step
        (``prepare``), and a word's share is one row of a table (``_word_gates``). So a step
        multiplies only the hidden state: it reads 1 of the LSTM's 3 MB of weights. On a 2-core
        CPU, beam search alone took 20-45% less time at batch 1-32, and the whole model call at
        batch 1 went from 27 to 34 images/s (python -m benchmarks.bench_model).
        Same arithmetic as nn.LSTM, up to float rounding; checked against teacher forcing in
        tests/test_model.py.
        """
        h, c = state  # (1, N, H) each, nn.LSTM's layout
        summary_gates = visual.summary_gates
        if summary_gates is None:
            summary_gates = F.linear(visual.summary, self._weights_ih()[1])
        gates = self._word_gates(tokens) + summary_gates + F.linear(h[0], self.lstm.weight_hh_l0)
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)  # nn.LSTM's order
        cell = torch.sigmoid(forget_gate) * c[0] + torch.sigmoid(in_gate) * torch.tanh(candidate)
        hidden = torch.sigmoid(out_gate) * torch.tanh(cell)
        logits = self._predict(hidden.unsqueeze(1), visual)[:, 0]
        return torch.log_softmax(logits.float(), dim=-1), (hidden.unsqueeze(0), cell.unsqueeze(0))

    def _weights_ih(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The LSTM's input weights split into the word's columns and the summary's."""
        weight = self.lstm.weight_ih_l0
        return weight[:, : self.embed.embedding_dim], weight[:, self.embed.embedding_dim :]

    def _word_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's share of the input gates, both LSTM biases included: (N, 4H)."""
        table = self._word_gate_table()
        if table is not None:
            return table[tokens]
        bias = self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0
        return F.linear(self.embed(tokens), self._weights_ih()[0], bias)

    def _word_gate_table(self) -> torch.Tensor | None:
        """Every word's gates (vocab, 4H), kept while the weights stay as they were.

        None while autograd records (a table would go stale inside a training step) and for
        vocabularies too large to tabulate. The key holds each weight's storage and version
        counter, so moving the model or changing a weight in place builds a new table.
        """
        gates = self.lstm.weight_ih_l0.shape[0]  # 4H
        if torch.is_grad_enabled() or self.embed.num_embeddings * gates > MAX_GATE_TABLE:
            return None
        weights = (
            self.embed.weight,
            self.lstm.weight_ih_l0,
            self.lstm.bias_ih_l0,
            self.lstm.bias_hh_l0,
        )
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cached = self._gate_table
        if cached is not None and cached[0] == key:
            return cached[1]
        # float32 whatever the autocast: the table outlives the call that builds it.
        with torch.autocast(self.embed.weight.device.type, enabled=False):
            bias = self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0
            table = torch.addmm(bias, self.embed.weight, self._weights_ih()[0].t())
        self._gate_table = (key, table)  # one assignment: safe across threads
        return table


class CaptionModel(nn.Module):
    """The whole captioner: ``forward`` for training, ``encode`` + ``decoder.step`` for decoding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.encoder)
        self.projector = FrameProjector(config)
        self.temporal = TemporalEncoder(config)
        self.memory = CellMemory(config)
        self.decoder = CaptionDecoder(config)
        self.retrieval = CaptionMemory(config) if config.retrieval_k else None
        # What the training inputs looked like, to flag inputs unlike them (domain.py).
        self.domain = DomainSummary(config) if config.domain_rank else None
        # The neighbours' words join the summary that conditions every decoding step.
        self.hint = nn.Linear(config.vocab_size, config.visual_dim) if config.retrieval_k else None
        self.frame_chunk = 16  # frames per CNN call; a runtime setting, not part of the config

    def frame_features(
        self, frames: torch.Tensor, lengths: torch.Tensor, encoder: nn.Module | None = None
    ) -> torch.Tensor:
        """Pixels (B, T, 3, H, W) -> CNN features (B, T, D), running the CNN on real frames only.

        ``encoder`` replaces ``self.encoder`` for inference (a compiled or ONNX Runtime copy).
        """
        encoder = encoder or self.encoder
        batch, steps = frames.shape[:2]
        valid = frame_mask(lengths, steps)  # (B, T)
        # TimeDistributed over the real frames, a few at a time: large CNN batches cost more
        # per frame on CPUs and hold every activation map of every frame at once.
        real = frames[valid]
        flat = torch.cat([encoder(part) for part in real.split(self.frame_chunk)])  # (n, D)
        features = flat.new_zeros(batch, steps, flat.shape[-1])
        features[valid] = flat
        return features

    def encode(
        self,
        lengths: torch.Tensor,
        *,
        frames: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> VisualContext:
        """Frames (B, T, 3, H, W) or precomputed features (B, T, D) -> the decoder's context.

        A retrieval-augmented model looks up each sequence's neighbours in its caption memory;
        ``exclude`` (B,) names a memory row each must not find (training items find themselves).
        """
        if (frames is None) == (features is None):
            raise ValueError("pass exactly one of frames or features")
        if features is None:
            features = self.frame_features(frames, lengths)  # type: ignore[arg-type]
        words = None
        if self.retrieval is not None:
            words = self.retrieval.bag_of_words(self.retrieval.key(features, lengths), exclude)
        # Project real frames only: a batch mixing images and clips is mostly padding.
        valid = frame_mask(lengths, features.shape[1])  # (B, T)
        cells, frame_embeddings = self.projector(features[valid])  # (n, M, C), (n, F)
        batch_cells = cells.new_zeros(*valid.shape, *cells.shape[1:])
        batch_cells[valid] = cells
        batch_frames = frame_embeddings.new_zeros(*valid.shape, frame_embeddings.shape[-1])
        batch_frames[valid] = frame_embeddings
        keys, values = self.memory(batch_cells, lengths)
        summary = self.temporal(batch_frames, lengths)
        if self.hint is not None and words is not None:
            summary = summary + self.hint(words.to(summary.dtype))
        return VisualContext(summary, keys, values, words)

    def forward(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        frames: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Caption logits (B, L, vocab) for input tokens (B, L) that start with <bos>."""
        visual = self.encode(lengths, frames=frames, features=features, exclude=exclude)
        return self.decoder(tokens, visual)


def frame_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) boolean mask, True for the first ``lengths[b]`` frames of each sequence."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def masked_mean_and_change(
    sequence: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For (B, T, ...) zero-padded sequences: the mean over each real step, and last - first."""
    weights = frame_mask(lengths, sequence.shape[1]).to(sequence.dtype)
    weights = weights / lengths.to(sequence.dtype).unsqueeze(1)  # (B, T): 1/length or 0
    mean = torch.einsum("bt,bt...->b...", weights, sequence)
    last = sequence[torch.arange(len(sequence), device=sequence.device), lengths - 1]
    return mean, last - sequence[:, 0]  # the change is zero for a single image


def create_model(config: ModelConfig) -> CaptionModel:
    """A new model; the encoder gets its pretrained weights when the config names a source."""
    model = CaptionModel(config)
    if config.encoder.pretrained:
        load_pretrained_weights(model.encoder, config.encoder.pretrained)
    return model
