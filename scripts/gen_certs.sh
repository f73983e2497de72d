#!/usr/bin/env bash
# Makes a throwaway certificate authority and a server certificate in DIR
# (ca.crt, server.crt, server.key), valid DAYS (default 30), for the names
# SAN (default DNS:localhost,IP:127.0.0.1). `make up` and the TLS tests use
# it; production certificates come from your own CA.
set -euo pipefail
dir=${1:?usage: gen_certs.sh DIR [DAYS] [SAN]}
days=${2:-30}
san=${3:-DNS:localhost,IP:127.0.0.1}
mkdir -p "$dir"
cd "$dir"
curve=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${curve[@]}" -keyout ca.key -out ca.crt -days "$days" -subj "/CN=shardgate throwaway CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req "${curve[@]}" -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
printf '%s\n' "subjectAltName=$san" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days "$days" -extfile server.ext 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
