"""Where a Model's weights come from: ``spec.source`` and its five schemes.

- ``hf://ORG/NAME[@REVISION]``: a Hugging Face hub repository; an init container of the
  worker image downloads it into a node-local cache (``spec.sourceSecret`` names a Secret
  whose ``HF_TOKEN`` key is the hub token, for gated or private repositories).
- ``pvc://CLAIM[/SUBPATH]``: a PersistentVolumeClaim in the Model's namespace, mounted
  read-only; the checkpoint is at SUBPATH inside it.
- ``oci://IMAGE[:TAG|@DIGEST]``: an OCI image whose files are the checkpoint, mounted
  read-only as a Kubernetes image volume.
- ``host:///PATH``: a directory already on every GPU node (hostPath, read-only).
- ``file:///PATH``: a directory already inside the worker image.

One regular expression per scheme, used by pydantic here and, as the same text, by the
API server's CEL rule, so a file and ``kubectl apply`` refuse the same sources with the
same message. Pure: no kopf, kubernetes or torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

Scheme = Literal["hf", "pvc", "oci", "host", "file"]
SCHEMES: tuple[Scheme, ...] = ("hf", "pvc", "oci", "host", "file")

# A hub repository id: ORG/NAME, each part letters and digits joined by single '-', '_'
# or '.' (the hub refuses '--' and '..'; no public repository needs two separators in a
# row, and a regular expression without look-ahead, as CEL has, says it this way).
_HUB_PART = r"[A-Za-z0-9](?:[._-]?[A-Za-z0-9])*"
# A revision: a branch or tag name without '/', or a commit id. A branch with '/' cannot
# key a cache directory safely; name its commit instead.
_REVISION = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?"
HF_PATTERN = rf"^hf://({_HUB_PART})/({_HUB_PART})(?:@({_REVISION}))?$"

# A PVC name is a DNS subdomain. Paths are made of parts that are not all dots (no '.'
# or '..') and not empty (no '//').
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*"
_PATH_NAME = r"[A-Za-z0-9_.+=@-]*[A-Za-z0-9_+=@-][A-Za-z0-9_.+=@-]*"
_REL_PATH = rf"(?:{_PATH_NAME}/)*{_PATH_NAME}"
PVC_PATTERN = rf"^pvc://({_DNS_SUBDOMAIN})(?:/({_REL_PATH}))?$"

# An image reference as container runtimes parse it (the distribution reference grammar):
# [registry[:port]/]path[:tag][@digest], the path in lowercase.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]{0,61}[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = (
    rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*(?::[0-9]{{1,5}})?/)?"
    rf"{_PATH_PART}(?:/{_PATH_PART})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,128})?"
)
OCI_PATTERN = rf"^oci://({IMAGE_REFERENCE})$"

# An absolute path (host:///models/llama, file:///weights).
_ABS_PATH = rf"(?:/{_PATH_NAME})+"
HOST_PATTERN = rf"^host://({_ABS_PATH})$"
FILE_PATTERN = rf"^file://({_ABS_PATH})$"

PATTERNS: dict[Scheme, str] = {"hf": HF_PATTERN, "pvc": PVC_PATTERN, "oci": OCI_PATTERN,
                               "host": HOST_PATTERN, "file": FILE_PATTERN}

# One message per scheme: what was wrong and what a good source looks like.
MESSAGES: dict[Scheme, str] = {
    "hf": "source hf:// must be hf://ORG/NAME or hf://ORG/NAME@REVISION (a hub repository "
          "id, e.g. hf://meta-llama/Llama-3.1-8B-Instruct; a revision is a branch, tag or "
          "commit without '/')",
    "pvc": "source pvc:// must be pvc://CLAIM or pvc://CLAIM/SUBPATH (a PersistentVolumeClaim "
           "name in the Model's namespace and a relative path without '..', e.g. "
           "pvc://models/llama-3-8b)",
    "oci": "source oci:// must be oci://IMAGE[:TAG][@DIGEST] (an image reference such as "
           "oci://registry.example.com/models/llama-3-8b:v1, the path in lowercase, no "
           "spaces)",
    "host": "source host:// must be host:///PATH (an absolute directory on every GPU node, "
            "without '..', e.g. host:///models/llama-3-8b)",
    "file": "source file:// must be file:///PATH (an absolute directory inside the worker "
            "image, without '..', e.g. file:///weights/llama-3-8b)",
}
UNKNOWN_SCHEME = ("source must start with hf://, pvc://, oci://, host:// or file:// "
                  "(e.g. hf://meta-llama/Llama-3.1-8B-Instruct)")
DEFAULT_REVISION = "main"


@dataclass(frozen=True)
class Source:
    """A parsed ``spec.source``. ``location`` is what the scheme names: the repo id
    (``ORG/NAME``), the claim name, the image reference or the absolute path."""

    scheme: Scheme
    location: str
    revision: Optional[str] = None  # hf: as written (None: the default branch)
    subpath: Optional[str] = None  # pvc: the checkpoint's directory inside the claim

    def __str__(self) -> str:
        if self.scheme == "hf":
            return f"hf://{self.location}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme == "pvc":
            return f"pvc://{self.location}" + (f"/{self.subpath}" if self.subpath else "")
        if self.scheme in ("host", "file"):
            return f"{self.scheme}://{self.location}"
        return f"oci://{self.location}"


def scheme_of(text: str) -> Optional[Scheme]:
    head = text.split("://", 1)[0] if "://" in text else None
    return head if head in SCHEMES else None  # type: ignore[return-value]


def source_problem(text: str) -> Optional[str]:
    """None when ``text`` is a valid source, else the one message that says why not."""
    scheme = scheme_of(text)
    if scheme is None:
        return UNKNOWN_SCHEME
    if re.fullmatch(PATTERNS[scheme], text) is None:
        return MESSAGES[scheme]
    return None


def parse_source(text: str) -> Source:
    """The parsed source; ValueError with the scheme's message when it is not valid."""
    problem = source_problem(text)
    if problem:
        raise ValueError(problem)
    scheme = scheme_of(text)
    match = re.fullmatch(PATTERNS[scheme], text)  # type: ignore[index]
    assert scheme is not None and match is not None
    if scheme == "hf":
        return Source("hf", f"{match.group(1)}/{match.group(2)}", revision=match.group(3))
    if scheme == "pvc":
        return Source("pvc", match.group(1), subpath=match.group(2))
    return Source(scheme, match.group(1))


def hf_cache_path(source: Source) -> str:
    """Where an ``hf://`` checkpoint lives under the weights cache: one directory per
    repository and revision (``hf/ORG/NAME/REVISION``), so replicas of the same revision
    on one node share one download and another revision never overwrites it."""
    if source.scheme != "hf":
        raise ValueError(f"{source} is not an hf:// source")
    return f"hf/{source.location}/{source.revision or DEFAULT_REVISION}"
