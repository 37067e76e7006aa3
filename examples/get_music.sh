#!/bin/sh
# Fetch the freely licensed game music the shipped teacher and model were trained on (Debian packages; see
# README "The shipped model" for versions and licences) into OUT/train (51 files) and OUT/heldout (8 files).
#   sh examples/get_music.sh music      # needs apt-get with a Debian/Ubuntu archive; no root
set -e
OUT=${1:-music}
mkdir -p "$OUT/debs" "$OUT/x" "$OUT/train" "$OUT/heldout"
cd "$OUT/debs"
apt-get download wesnoth-1.16-music fretsonfire-songs-muldjord fretsonfire-songs-sectoid asc-music
for d in *.deb; do dpkg -x "$d" ../x; done
cd ..
S=x/usr/share/games
for f in "$S"/wesnoth/1.16/data/core/music/*.ogg; do
    n=$(basename "$f")
    [ "$n" = silence.ogg ] || cp "$f" "train/wesnoth_$n"
done
for f in "$S"/fretsonfire/data/songs/*/*/*.ogg; do
    cp "$f" "train/fof_$(basename "$(dirname "$f")" | tr ' ' _)_$(basename "$f")"
done
for f in "$S"/asc/music/*.mp3; do cp "$f" "train/asc_$(basename "$f")"; done
for n in asc_time_to_strike.mp3 fof_mutilated_mime_guitar.ogg fof_mutilated_mime_song.ogg \
         wesnoth_elvish-theme.ogg wesnoth_knolls.ogg wesnoth_northerners.ogg wesnoth_the_deep_path.ogg \
         wesnoth_wanderer.ogg; do
    mv "train/$n" heldout/
done
rm -rf x
echo "$OUT/train: $(ls train | wc -l) files, $OUT/heldout: $(ls heldout | wc -l) files"
