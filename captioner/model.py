"""CaptionModel: frames -> CNN per frame -> temporal LSTM -> LSTM caption decoder.

The CNN runs on every frame (the TimeDistributed pattern); an LSTM reads the frame embeddings in
order, so motion and order matter (LRCN, Donahue et al. 2015). The clip embedding conditions a
Show-and-Tell decoder (Vinyals et al. 2015) through its initial state, and is also fed beside each
word (LRCN's "factored" input), which keeps small models from forgetting the picture.
An image is a sequence of one frame. The loss lives in ``training.py``, not here.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from captioner.config import ModelConfig
from captioner.encoder import ImageEncoder, load_pretrained_weights

DecoderState = tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), each (1, N, H)


class FrameProjector(nn.Module):
    """One frame's grid features -> a frame embedding (frame_dim).

    Each cell of the final map and of the first-stage map is projected on its own, so the
    embedding keeps where things are; the mean of the final cells adds what is there overall.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        enc = config.encoder
        self.cells, self.channels = enc.grid_size * enc.grid_size, enc.feature_channels
        self.early_cells, self.early_channels = enc.early_grid * enc.early_grid, enc.early_channels
        self.norm = nn.LayerNorm(self.channels)
        self.cell_proj = nn.Linear(self.channels, config.cell_dim)
        self.global_proj = nn.Linear(self.channels, config.frame_dim)
        mixed = self.cells * config.cell_dim
        if self.early_cells:
            self.early_norm = nn.LayerNorm(self.early_channels)
            self.early_proj = nn.Linear(self.early_channels, config.early_cell_dim)
            mixed += self.early_cells * config.early_cell_dim
        self.mix = nn.Linear(mixed, config.frame_dim)
        self.act = nn.GELU()
        # Normalised frame embeddings keep the temporal LSTM's gates out of saturation.
        self.out_norm = nn.LayerNorm(config.frame_dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        lead = features.shape[:-1]
        final_dim = self.cells * self.channels
        cells = self.norm(features[..., :final_dim].reshape(*lead, self.cells, self.channels))
        parts = [self.act(self.cell_proj(cells)).flatten(-2)]  # (..., g*g*cell_dim)
        if self.early_cells:
            early = features[..., final_dim:].reshape(*lead, self.early_cells, self.early_channels)
            parts.append(self.act(self.early_proj(self.early_norm(early))).flatten(-2))
        overall = self.global_proj(cells.mean(-2))  # (..., frame_dim)
        mixed = self.act(self.mix(torch.cat(parts, dim=-1)) + overall)
        return self.dropout(self.out_norm(mixed))


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
        mask = frame_mask(lengths, frames.shape[1]).unsqueeze(-1).to(frames.dtype)  # (B, T, 1)
        mean = (frames * mask).sum(1) / lengths.to(frames.dtype).unsqueeze(-1)  # (B, F)
        last = frames[torch.arange(len(frames), device=frames.device), lengths - 1]  # (B, F)
        displacement = last - frames[:, 0]  # zero for a single image
        summary = torch.cat([h_last[0], mean, displacement], dim=-1)
        return self.dropout(self.norm(self.out(summary)))


class CaptionDecoder(nn.Module):
    """LSTM language model conditioned on a visual embedding (B, V)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.word_dim)
        self.init_h = nn.Linear(config.visual_dim, config.decoder_hidden)
        self.init_c = nn.Linear(config.visual_dim, config.decoder_hidden)
        self.lstm = nn.LSTM(
            config.word_dim + config.visual_dim, config.decoder_hidden, batch_first=True
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.decoder_hidden, config.vocab_size)

    def init_state(self, visual: torch.Tensor) -> DecoderState:
        """Show-and-Tell conditioning: the picture sets the LSTM's initial state."""
        return (
            torch.tanh(self.init_h(visual)).unsqueeze(0).contiguous(),
            torch.tanh(self.init_c(visual)).unsqueeze(0).contiguous(),
        )

    def forward(self, tokens: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: tokens (B, L) -> logits (B, L, vocab), one step per input token."""
        words = self.embed(tokens)  # (B, L, W)
        inputs = torch.cat([words, visual.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1)
        hidden, _ = self.lstm(self.dropout(inputs), self.init_state(visual))  # (B, L, H)
        return self.head(self.dropout(hidden))

    def step(
        self, tokens: torch.Tensor, state: DecoderState, visual: torch.Tensor
    ) -> tuple[torch.Tensor, DecoderState]:
        """One decoding step: tokens (N,) -> log-probabilities (N, vocab) and the next state."""
        inputs = torch.cat([self.embed(tokens), visual], dim=-1).unsqueeze(1)  # (N, 1, W+V)
        hidden, state = self.lstm(inputs, state)
        logits = self.head(hidden[:, 0])
        return torch.log_softmax(logits.float(), dim=-1), state


class CaptionModel(nn.Module):
    """The whole captioner: ``forward`` for training, ``encode`` + ``decoder.step`` for decoding."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.encoder)
        self.projector = FrameProjector(config)
        self.temporal = TemporalEncoder(config)
        self.decoder = CaptionDecoder(config)
        self.frame_chunk = 16  # frames per CNN call; a runtime setting, not part of the config

    def frame_features(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pixels (B, T, 3, H, W) -> CNN features (B, T, D), running the CNN on real frames only."""
        batch, steps = frames.shape[:2]
        valid = frame_mask(lengths, steps)  # (B, T)
        # TimeDistributed over the real frames, a few at a time: large CNN batches cost more
        # per frame on CPUs and hold every activation map of every frame at once.
        real = frames[valid]
        flat = torch.cat([self.encoder(part) for part in real.split(self.frame_chunk)])  # (n, D)
        features = flat.new_zeros(batch, steps, flat.shape[-1])
        features[valid] = flat
        return features

    def encode(
        self,
        lengths: torch.Tensor,
        *,
        frames: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Frames (B, T, 3, H, W) or precomputed features (B, T, D) -> visual embedding (B, V)."""
        if (frames is None) == (features is None):
            raise ValueError("pass exactly one of frames or features")
        if features is None:
            features = self.frame_features(frames, lengths)  # type: ignore[arg-type]
        return self.temporal(self.projector(features), lengths)

    def forward(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        *,
        frames: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Caption logits (B, L, vocab) for input tokens (B, L) that start with <bos>."""
        return self.decoder(tokens, self.encode(lengths, frames=frames, features=features))


def frame_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, T) boolean mask, True for the first ``lengths[b]`` frames of each sequence."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def create_model(config: ModelConfig) -> CaptionModel:
    """A new model; the encoder gets its pretrained weights when the config names a source."""
    model = CaptionModel(config)
    if config.encoder.pretrained:
        load_pretrained_weights(model.encoder, config.encoder.pretrained)
    return model
