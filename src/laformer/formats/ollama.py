"""An Ollama ``Modelfile`` next to an exported GGUF: FROM, TEMPLATE (Go syntax) and stop parameters.

Ollama templates are Go templates, not Jinja, so the chat template is recognised by its markers (ChatML, Llama 3,
Llama 2/Mistral ``[INST]``) and written in Ollama's form; a default system prompt the Jinja template inserts
becomes SYSTEM. An unrecognised template is left out (Ollama then falls back to the GGUF's own metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from laformer.errors import CheckpointError

_TEMPLATES = {
    "<|im_start|>": '{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                    '<|im_start|>assistant\n',
    "<|start_header_id|>": '{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>'
                           '{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                           '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n',
    "[INST]": '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ if $.System }}{{ $.System }}\n\n{{ end }}'
              '{{ .Content }} [/INST]{{- else }} {{ .Content }}</s>{{- end }}{{- end }}',
}
_STOPS = {"<|im_start|>": ["<|im_end|>", "<|im_start|>"], "<|start_header_id|>": ["<|eot_id|>"],
          "[INST]": ["[INST]", "</s>"]}
_PROBE = "\x00probe\x00"


def write_modelfile(directory: str | Path, gguf_path: str | Path, tokenizer: Any) -> Path:
    """Write ``directory/Modelfile`` for ``ollama create NAME -f directory/Modelfile``; returns its path."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"--ollama {directory} is a file; pass a folder for the Modelfile")
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"FROM {Path(gguf_path).resolve()}"]
    marker = next((m for m in _TEMPLATES if m in (tokenizer.chat_template or "")), None)
    if marker is not None:
        lines.append(f'TEMPLATE """{_TEMPLATES[marker]}"""')
        system = _default_system_prompt(tokenizer, marker)
        if system:
            lines.append(f'SYSTEM """{system}"""')
        lines += [f'PARAMETER stop "{stop}"' for stop in _STOPS[marker]]
    elif tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    path = directory / "Modelfile"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _default_system_prompt(tokenizer: Any, marker: str) -> str | None:
    """The system message the Jinja template adds when the conversation has none (SmolLM2 does), if any."""
    if marker != "<|im_start|>":
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE}], tokenize=False)
    head = text.split("<|im_start|>user", 1)[0]
    prefix = "<|im_start|>system\n"
    return head.split(prefix, 1)[1].split("<|im_end|>", 1)[0] if prefix in head else None
