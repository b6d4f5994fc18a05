"""Write the sample media shipped in captioner/assets/samples (used by the README and tests).

    python tools/make_samples.py

They come from the scenes generator with seed 99, which the default model never trained on:
a one-object scene and a clip of a shape moving right.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import av

from captioner.data.scenes import generate_corpus

SAMPLES = Path(__file__).resolve().parent.parent / "captioner" / "assets" / "samples"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = generate_corpus(Path(tmp), 12, 12, seed=99)
        items = [json.loads(line) for line in manifest.read_text().splitlines()]
        scene = next(i for i in items if i["meta"].get("scene") == "one_object")
        clip = next(
            i for i in items if i["kind"] == "video" and i["meta"]["motion"]["kind"] == "right"
        )
        SAMPLES.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / scene["path"], SAMPLES / "scene.png")
        shutil.copy(Path(tmp) / clip["path"], SAMPLES / "motion.mp4")
        frames_dir = SAMPLES / "frames"
        shutil.rmtree(frames_dir, ignore_errors=True)
        frames_dir.mkdir()
        with av.open(str(SAMPLES / "motion.mp4")) as container:
            frames = [frame.to_image() for frame in container.decode(video=0)]
        step = len(frames) / 8
        for n in range(8):  # eight frames spread over the clip, in order
            frames[int(n * step)].save(frames_dir / f"{n:03d}.png")
        truth = {
            "scene.png": {"captions": scene["captions"], "meta": scene["meta"]},
            "motion.mp4": {"captions": clip["captions"], "meta": clip["meta"]},
        }
        (SAMPLES / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    print(SAMPLES)


if __name__ == "__main__":
    main()
