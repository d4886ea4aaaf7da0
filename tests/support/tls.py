"""Throw-away certificates for TLS tests, made with the `openssl` command line.

pki = Pki.create(tmp_path)             # a CA, and a server cert for localhost
cert, key = pki.client("silo-alpha")       # a client cert with CN=silo-alpha
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")


@dataclass(frozen=True)
class Pki:
    """A CA and certificates it signed, all in `root`."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, root: Path, *, ca_name: str = "tff-amqp test CA") -> Pki:
        root.mkdir(parents=True, exist_ok=True)
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={ca_name}", "-keyout", "ca.key", "-out", "ca.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=root,
        )  # fmt: skip
        pki = cls(root, root / "ca.pem", root / "ca.key", root / "server.pem", root / "server.key")
        pki._sign("server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                  "extendedKeyUsage=serverAuth\n")  # fmt: skip
        return pki

    def client(self, common_name: str) -> tuple[Path, Path]:
        """A client certificate (and its key) with CN=`common_name`."""
        stem = f"client-{common_name}"
        self._sign(stem, common_name, "extendedKeyUsage=clientAuth\n")
        return self.root / f"{stem}.pem", self.root / f"{stem}.key"

    def _sign(self, stem: str, common_name: str, extensions: str) -> None:
        (self.root / f"{stem}.ext").write_text(extensions)
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={common_name}",
            "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
            cwd=self.root,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{stem}.ext", "-out", f"{stem}.pem",
            cwd=self.root,
        )  # fmt: skip
