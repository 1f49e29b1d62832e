#!/usr/bin/env bash
# Installs the peer systems (Apache Spark, Apache Flink) for the comparison
# benchmarks from PyPI and compiles the peer programs against their jars.
#
#   benches/peers/install.sh [--force]
#
# Idempotent: each step is skipped when its result is already there.
# Everything goes under target/peers/ (git-ignored):
#   target/peers/pkgs/      pyspark and apache-flink(-libraries), installed with pip --target --no-deps
#   target/peers/classes/   the compiled peer programs (spark/ and flink/)
#   target/peers/env.sh     JAVA, class paths and JVM options, for run.sh
# Maven Central is not needed: the jars come inside the PyPI packages
# (pyspark/jars/*.jar; pyflink/lib/*.jar from apache-flink-libraries).
set -euo pipefail

# Pinned versions (see README.md for why these).
PYSPARK_VERSION=4.0.1
FLINK_VERSION=1.20.3

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PEERS=$ROOT/target/peers
PKGS=$PEERS/pkgs
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

say() { echo "[install] $*"; }

# --- 1. A JDK (17+): use the one on PATH, apt-get only if javac is missing.
if ! command -v javac >/dev/null 2>&1; then
    say "javac not found: installing openjdk-17-jdk-headless with apt-get"
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q openjdk-17-jdk-headless
fi
JAVAC=$(command -v javac)
JAVA=$(dirname "$(readlink -f "$JAVAC")")/java
[[ -x "$JAVA" ]] || JAVA=$(command -v java)
JAVA_MAJOR=$("$JAVA" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
if [[ -z "$JAVA_MAJOR" || "$JAVA_MAJOR" -lt 17 ]]; then
    echo "[install] need Java 17 or newer, found ${JAVA_MAJOR:-none} at $JAVA" >&2
    exit 1
fi
say "JDK: $JAVA (Java $JAVA_MAJOR)"

# --- 2. Python with pip, for the PyPI packages.
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
    say "pip not found: installing python3-pip with apt-get"
    SUDO=""
    [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q python3 python3-pip
    PYTHON=python3
fi

# --- 3. The pinned packages, jars included, without their Python dependencies.
WANT="pyspark==$PYSPARK_VERSION apache-flink==$FLINK_VERSION apache-flink-libraries==$FLINK_VERSION"
have_jars() {
    compgen -G "$PKGS/pyspark/jars/spark-core_*-$PYSPARK_VERSION.jar" >/dev/null &&
        compgen -G "$PKGS/pyflink/lib/flink-dist-$FLINK_VERSION.jar" >/dev/null
}
if [[ $FORCE -eq 0 && -f "$PKGS/.installed" && "$(cat "$PKGS/.installed")" == "$WANT" ]] && have_jars; then
    say "packages already installed: $WANT"
else
    say "installing $WANT into $PKGS (pip --no-deps; a few minutes: pyspark is ~430 MB, the Flink jars ~230 MB)"
    rm -rf "$PKGS"
    mkdir -p "$PKGS"
    PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir
        --no-deps --target "$PKGS")
    # One pip call, so that apache-flink (the Python glue, a platform wheel) and apache-flink-libraries
    # (the jars, under pyflink/lib and pyflink/opt) merge into one pyflink/ directory.
    if ! "${PIP[@]}" "pyspark==$PYSPARK_VERSION" "apache-flink==$FLINK_VERSION" "apache-flink-libraries==$FLINK_VERSION"; then
        # Where no apache-flink wheel fits this platform, the jars alone will do: we use no Python glue.
        say "warning: apache-flink==$FLINK_VERSION did not install here; installing its jars (apache-flink-libraries) alone"
        rm -rf "$PKGS"
        mkdir -p "$PKGS"
        "${PIP[@]}" "pyspark==$PYSPARK_VERSION" "apache-flink-libraries==$FLINK_VERSION"
    fi
    have_jars || { echo "[install] the packages installed but the jars are missing" >&2; exit 1; }
    echo "$WANT" >"$PKGS/.installed"
    say "installed: $(ls "$PKGS/pyspark/jars" | wc -l) Spark jars, $(ls "$PKGS/pyflink/lib" | wc -l) Flink jars"
fi

SPARK_CP="$PKGS/pyspark/jars/*"
FLINK_CP="$PKGS/pyflink/lib/*"

# --- 4. Compile the peer programs (common code with each system's own class path).
compile() { # name classpath sources...
    local name=$1 cp=$2
    shift 2
    local out=$PEERS/classes/$name stamp=$PEERS/classes/$name.stamp
    local newest
    newest=$(find "$HERE/src" -name '*.java' -newer "$stamp" 2>/dev/null | head -1 || true)
    if [[ $FORCE -eq 0 && -f "$stamp" && -z "$newest" && "$(cat "$stamp")" == "$WANT" ]]; then
        say "classes/$name up to date"
        return
    fi
    rm -rf "$out"
    mkdir -p "$out"
    "$JAVAC" -nowarn -encoding UTF-8 --release 17 -d "$out" -cp "$cp" "$@" 2>&1 | grep -v '^Note:' || true
    [[ -n "$(find "$out" -name '*.class' | head -1)" ]] || { echo "[install] javac failed for $name" >&2; exit 1; }
    echo "$WANT" >"$stamp"
    say "compiled $name peer into target/peers/classes/$name"
}
compile spark "$SPARK_CP" "$HERE"/src/peers/common/*.java "$HERE"/src/peers/spark/*.java
compile flink "$FLINK_CP" "$HERE"/src/peers/common/*.java "$HERE"/src/peers/flink/*.java

# --- 5. The generators must agree with an independent implementation (and WORKLOADS.md's reference values).
"$PYTHON" "$HERE/check_generators.py" "$PEERS/classes/spark" 20000 | sed 's/^/[install] /'

# --- 6. What run.sh needs.
JVM_OPTS="-XX:+IgnoreUnrecognizedVMOptions --add-opens=java.base/java.lang=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/java.lang.invoke=ALL-UNNAMED --add-opens=java.base/java.lang.reflect=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/java.io=ALL-UNNAMED --add-opens=java.base/java.net=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/java.nio=ALL-UNNAMED --add-opens=java.base/java.util=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/java.util.concurrent=ALL-UNNAMED --add-opens=java.base/java.util.concurrent.atomic=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/jdk.internal.ref=ALL-UNNAMED --add-opens=java.base/sun.nio.ch=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/sun.nio.cs=ALL-UNNAMED --add-opens=java.base/sun.security.action=ALL-UNNAMED"
JVM_OPTS+=" --add-opens=java.base/sun.util.calendar=ALL-UNNAMED -Djdk.reflect.useDirectMethodHandle=false"
JVM_OPTS+=" -Dio.netty.tryReflectionSetAccessible=true -Dlog4j2.configurationFile=$HERE/log4j2.properties"
cat >"$PEERS/env.sh" <<EOF
# Written by benches/peers/install.sh
PEERS_JAVA='$JAVA'
PEERS_PYTHON='$PYTHON'
PEERS_SPARK_CP='$PEERS/classes/spark:$SPARK_CP'
PEERS_FLINK_CP='$PEERS/classes/flink:$FLINK_CP'
PEERS_JVM_OPTS='$JVM_OPTS'
PEERS_VERSIONS='$WANT'
EOF
say "ready: $WANT; class paths in target/peers/env.sh"
