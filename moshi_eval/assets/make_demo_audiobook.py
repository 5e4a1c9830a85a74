"""Regenerate the demo audiobook shipped in this folder (dev time only; the package never runs this).

Needs `espeak-ng` and `flac` on PATH (Debian: `apt-get install espeak-ng flac`). The text is original,
written for this project (CC0). Output: `<speaker>__<book>__<chapter>.flac` (16 kHz mono, 16 bit, like
LibriLight) and a `.json` of metadata beside each; `moshi_eval.demo.demo_audiobook` lays them out as
`<speaker>/<book>/<chapter>.flac`.

    python moshi_eval/assets/make_demo_audiobook.py
"""
import json
from pathlib import Path
import subprocess
import tempfile
import wave

import numpy as np

from moshi_eval.data import resample

HERE = Path(__file__).parent
SAMPLE_RATE = 16000

BOOKS = [
    {
        "speaker": "1701", "book": "the_lighthouse_keeper", "title": "The Lighthouse Keeper",
        "voice": "en-us+m3", "speed": 150,
        "chapters": [
            "Chapter one. The lamp on the northern rock had burned every night for ninety years. "
            "Marta climbed the spiral stairs at dusk, wound the clockwork, and trimmed the wick. "
            "Below her the grey water folded against the stones.",
            "Chapter two. In winter the supply boat came only twice. Marta kept a ledger of oil and "
            "flour, of storms and of ships that passed without a signal. She wrote slowly, because "
            "the ink froze when the stove went out.",
            "Chapter three. One morning a small boat drifted into the cove with no one aboard. "
            "Its sail was patched with a map of a coast she did not know. Marta dried the map by the "
            "fire and began to read the names aloud.",
        ],
    },
    {
        "speaker": "2450", "book": "notes_on_the_river", "title": "Notes on the River",
        "voice": "en-gb+f3", "speed": 155,
        "chapters": [
            "Chapter one. The river rises in a field of reeds, so quietly that a walker can step across "
            "it without noticing. Within a mile it has gathered three streams and a name.",
            "Chapter two. At the mill town the water is held behind a weir. Children fish from the "
            "bridge in summer, and in spring the floods carry whole trees past the church, "
            "turning slowly like tired swimmers.",
            "Chapter three. Near the sea the river widens and grows brown with silt. Herons stand in the "
            "shallows at low tide. The ferryman says the current is different every day, and he has "
            "crossed it for forty years.",
        ],
    },
]


def synthesize(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech as float32 mono at SAMPLE_RATE, with 0.3 s of silence at each end."""
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav_path), text], check=True)
        with wave.open(str(wav_path)) as w:
            assert w.getnchannels() == 1 and w.getsampwidth() == 2
            rate = w.getframerate()
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
    pcm = resample(pcm, rate, SAMPLE_RATE)
    pad = np.zeros(int(0.3 * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([pad, pcm, pad])


def write_flac(path: Path, pcm: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "pcm.wav"
        with wave.open(str(wav_path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes((np.clip(pcm, -1, 1) * 32767).round().astype(np.int16).tobytes())
        subprocess.run(["flac", "--silent", "--force", "-8", "-o", str(path), str(wav_path)], check=True)


def main() -> None:
    for old in HERE.glob("*__*__*.*"):
        old.unlink()
    for book in BOOKS:
        for index, text in enumerate(book["chapters"], start=1):
            stem = f"{book['speaker']}__{book['book']}__chapter_{index}"
            pcm = synthesize(text, book["voice"], book["speed"])
            write_flac(HERE / f"{stem}.flac", pcm)
            meta = {
                "title": book["title"], "book": book["book"], "speaker": book["speaker"],
                "chapter": index, "duration": round(len(pcm) / SAMPLE_RATE, 3), "sample_rate": SAMPLE_RATE,
                "text": text, "synthesizer": f"espeak-ng voice {book['voice']} speed {book['speed']}",
                "license": "CC0-1.0 (original text and synthetic speech, written for moshi-patch)",
            }
            (HERE / f"{stem}.json").write_text(json.dumps(meta, indent=1) + "\n")
            print(stem, meta["duration"], "s")


if __name__ == "__main__":
    main()
