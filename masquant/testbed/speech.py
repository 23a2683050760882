"""Synthetic speech for the audio testbed: Debian's espeak-ng, resampled to Whisper's 16 kHz.

espeak-ng is a system program (``apt-get install espeak-ng``; ``scripts/setup.sh`` installs it where it
can). Its output is deterministic for a given text, voice, speed and pitch, so the testbed's clips are
reproducible; voices and speeds vary per document to keep the projector from memorising one waveform.
"""

from __future__ import annotations

import functools
import io
import re
import shutil
import subprocess
import wave

import numpy as np

from masquant.calibration.audio import resample

SAMPLE_RATE = 16000
ESPEAK = "espeak-ng"
ESPEAK_INSTALL_HINT = "apt-get install espeak-ng (Debian/Ubuntu; bash scripts/setup.sh does it where it can)"
VOICES = ("en-us", "en", "en-us+m3", "en+f3", "en-us+f2", "en+m7")


class SpeechSynthesisError(RuntimeError):
    pass


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


@functools.lru_cache(maxsize=1)
def espeak_version() -> str | None:
    """e.g. "1.51" (the clips, and so testbed-omni's numbers, depend on it); None where it is not installed."""
    if not espeak_available():
        return None
    out = subprocess.run([ESPEAK, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"text-to-speech:\s*(\S+)", out)
    return m.group(1) if m else out.strip()[:40] or None


@functools.lru_cache(maxsize=4096)
def _synthesize_cached(text: str, voice: str, speed: int, pitch: int) -> bytes:
    if not espeak_available():
        raise SpeechSynthesisError(f"{ESPEAK} is not installed: {ESPEAK_INSTALL_HINT}")
    result = subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                            capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise SpeechSynthesisError(f"{ESPEAK} failed on {text!r}: {result.stderr.decode(errors='replace')[:200]}")
    return result.stdout


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """``text`` spoken by espeak-ng: float32 samples in [-1, 1] at 16 kHz, leading/trailing silence trimmed."""
    with wave.open(io.BytesIO(_synthesize_cached(text, voice, int(speed), int(pitch)))) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.01)
    if loud.size:
        pad = int(0.05 * rate)
        x = x[max(0, loud[0] - pad):loud[-1] + pad]
    return resample(x, rate, SAMPLE_RATE)


def write_wav(path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit mono WAV (what ``calib=file`` rows and ``masquant.calibration.data.load_media`` read)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
