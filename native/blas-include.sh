#!/bin/sh
# Where OpenBLAS's cblas.h is, for binding.gyp: pkg-config's answer, else the usual folders.
if command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openblas; then
  pkg-config --cflags-only-I openblas | sed 's/-I//g'
  exit 0
fi
for d in /usr/include/x86_64-linux-gnu/openblas-pthread /usr/include/aarch64-linux-gnu/openblas-pthread /usr/include/openblas /opt/homebrew/opt/openblas/include /usr/local/include /usr/include; do
  if [ -f "$d/cblas.h" ]; then echo "$d"; exit 0; fi
done
