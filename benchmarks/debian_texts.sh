#!/usr/bin/env bash
# The English texts of docs/real_models.md, built from Debian packages into one folder of .txt files:
#   bash benchmarks/debian_texts.sh DIR          # kjv.txt fortunes.txt jargon.txt devil.txt foldoc.txt
#   bash benchmarks/debian_texts.sh DIR kjv fortunes   # only these
# Needs (as root): apt-get install bible-kjv fortunes jargon-text dict-devil dict-foldoc
# Token counts of SmolLM2's tokenizer (with the Debian 12 packages of 2026-12): kjv 1 022 990, fortunes 696 706,
# jargon 407 269, devil 95 504, foldoc 1 579 077; `tl-sparsity run --text DIR` reads kjv + fortunes as 1 719 580 tokens.
set -euo pipefail
dir=${1:?usage: debian_texts.sh DIR [kjv fortunes jargon devil foldoc]}
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(kjv fortunes jargon devil foldoc)
mkdir -p "$dir"
need() { [ -e "$1" ] || { echo "debian_texts.sh: $1 is missing: apt-get install $2" >&2; exit 1; }; }
for n in "${names[@]}"; do
  case $n in
    kjv)  # the King James Bible, verse labels ("Ge1:1 ") removed
      command -v bible > /dev/null || { echo "debian_texts.sh: no 'bible' command: apt-get install bible-kjv" >&2; exit 1; }
      bible -f "gen1:1-rev22:21" | sed -E 's/^[0-9]?[A-Za-z]+[0-9]+:[0-9]+ //' > "$dir/kjv.txt" ;;
    fortunes)  # every English fortune file but ascii-art, without the .dat/.u8 indexes and the % separators
      need /usr/share/games/fortunes fortunes
      for f in /usr/share/games/fortunes/*; do
        case $f in *.dat|*.u8|*/ascii-art) ;; *) [ -f "$f" ] && grep -v '^%$' "$f" || true ;; esac
      done > "$dir/fortunes.txt" ;;
    jargon)
      need /usr/share/doc/jargon-text/jargon.txt.gz jargon-text
      gzip -dc /usr/share/doc/jargon-text/jargon.txt.gz > "$dir/jargon.txt" ;;
    devil)
      need /usr/share/dictd/devil.dict.dz dict-devil
      gzip -dc /usr/share/dictd/devil.dict.dz > "$dir/devil.txt" ;;
    foldoc)
      need /usr/share/dictd/foldoc.dict.dz dict-foldoc
      gzip -dc /usr/share/dictd/foldoc.dict.dz > "$dir/foldoc.txt" ;;
    *) echo "debian_texts.sh: unknown text $n (kjv, fortunes, jargon, devil, foldoc)" >&2; exit 1 ;;
  esac
done
sha256sum "$dir"/*.txt
