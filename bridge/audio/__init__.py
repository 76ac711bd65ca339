"""Audio front-end: any ingress (WebSocket PCM, SIP G.711 8 kHz, WebRTC 48 kHz) -> 16 kHz PCM16 mono per channel."""

from .channels import deinterleave, interleave
from .codecs import Encoding, InvalidAudio, InvalidAudioConfig, bytes_per_sample, decode, encode
from .frontend import MAX_FRAME_BYTES, AudioFormat, AudioFrontEnd
from .resample import StreamResampler
from .wav import WavRecorder, read_wav

__all__ = [
    "AudioFormat",
    "AudioFrontEnd",
    "Encoding",
    "InvalidAudio",
    "InvalidAudioConfig",
    "MAX_FRAME_BYTES",
    "StreamResampler",
    "WavRecorder",
    "bytes_per_sample",
    "decode",
    "deinterleave",
    "encode",
    "interleave",
    "read_wav",
]
