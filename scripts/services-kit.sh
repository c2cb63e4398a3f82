#!/usr/bin/env bash
# Pack a RabbitMQ and a Redis that run from a folder, for a machine that has neither and no network
# (the GPU device machine: Ubuntu 24.04, see ../shared/gpu/README.md). Debian 12's own packages
# (rabbitmq-server 3.10, Erlang 25, redis-server 7.0: the versions CI runs against) are fetched with
# `apt-get download`, unpacked, and every shared library their programs need beyond glibc is copied
# beside them, so nothing is installed on the target and nothing there is overwritten.
#   scripts/services-kit.sh [OUT.tar.xz]      (default: .gk5/services.tar.xz)
# Unpack and start it there with scripts/services-start.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.gk5/services.tar.xz}
mkdir -p "$(dirname "$out")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

packages=(rabbitmq-server erlang-base erlang-asn1 erlang-crypto erlang-eldap erlang-inets
  erlang-mnesia erlang-os-mon erlang-parsetools erlang-public-key erlang-runtime-tools erlang-ssl
  erlang-syntax-tools erlang-tools erlang-xmerl redis-server redis-tools)
mkdir "$work/debs" "$work/kit"
(cd "$work/debs" && apt-get download "${packages[@]}" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$work/kit/root"; done
kit=$work/kit
erts=$(basename "$(find "$kit/root/usr/lib/erlang" -maxdepth 1 -name 'erts-*' | head -1)")
rmq=$(find "$kit/root/usr/lib/rabbitmq/lib" -maxdepth 1 -name 'rabbitmq_server-*' | head -1)

# Debian's `erl` scripts always start /usr/lib/erlang; these start the Erlang they belong to.
# (RabbitMQ runs `code:root_dir()/bin/erl` itself to start epmd, so both copies matter.)
mkdir "$kit/bin"
erl_root=$kit/root/usr/lib/erlang
for erl in "$erl_root/bin/erl" "$erl_root/$erts/bin/erl"; do
  cat > "$erl" <<EOF
#!/bin/sh
here=\$(dirname "\$(readlink -f "\$0")")
case \$here in
  */erts-*/bin) ROOTDIR=\$(cd "\$here/../.." && pwd) ;;
  *) ROOTDIR=\$(cd "\$here/.." && pwd) ;;
esac
BINDIR="\$ROOTDIR/$erts/bin"
EMU=beam
PROGNAME=erl
export ROOTDIR BINDIR EMU PROGNAME
exec "\$BINDIR/erlexec" "\$@"
EOF
  chmod +x "$erl"
done
ln -s ../root/usr/lib/erlang/bin/erl "$kit/bin/erl"
for tool in escript erlc; do ln -s "../root/usr/lib/erlang/$erts/bin/$tool" "$kit/bin/$tool"; done
ln -s "../root/usr/lib/erlang/$erts/bin/epmd" "$kit/bin/epmd"
for tool in redis-server redis-cli; do ln -s "../root/usr/bin/$tool" "$kit/bin/$tool"; done

# Shared libraries beyond glibc (the target may lack libjemalloc, liblzf, a given libssl ...).
mkdir "$kit/lib"
find "$kit/root" -type f \( -perm -u+x -o -name '*.so*' \) -print0 |
  while IFS= read -r -d '' f; do
    ldd "$f" 2>/dev/null | awk '/=> \//{print $3}' || true
  done | sort -u | while read -r lib; do
    case $(basename "$lib") in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libresolv.so.*|libutil.so.*) ;;
      *) cp -L "$lib" "$kit/lib/" ;;
    esac
  done
# OpenSSL loads its providers (Erlang's crypto asks for the legacy one) from a compiled-in folder;
# bring the one that matches the bundled libcrypto (services-start.sh sets OPENSSL_MODULES).
mkdir "$kit/lib/ossl-modules"
cp -L "$(openssl version -m | sed -n 's/^MODULESDIR: "\(.*\)"$/\1/p')/legacy.so" "$kit/lib/ossl-modules/"
# What the start script needs to know, and where it came from.
{
  echo "erts=$erts"
  echo "rabbitmq_home=root/usr/lib/rabbitmq/lib/$(basename "$rmq")"
  echo "# packages (Debian $(cut -d. -f1 /etc/debian_version)):"
  for deb in "$work"/debs/*.deb; do echo "#   $(dpkg-deb -f "$deb" Package) $(dpkg-deb -f "$deb" Version)"; done
} > "$kit/KIT"
rm -rf "$kit/root/usr/share/doc" "$kit/root/usr/share/man" "$kit/root/etc/init.d" "$kit/root/lib/systemd"
tar -C "$work" -cf - kit | xz -9 -T2 > "$out"
echo "$out: $(du -h "$out" | cut -f1) ($(find "$kit/lib" -type f | wc -l) libraries bundled)"
