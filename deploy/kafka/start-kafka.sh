#!/bin/sh
# Single-node KRaft broker for tests (testcontainers): listens on $KAFKA_PORT inside
# the container and advertises 127.0.0.1:$KAFKA_PORT, so publish that port on the
# same host port. The same settings as `embedstream kafka start` (flows/dev/kafka.py).
set -eu
port="${KAFKA_PORT:-9092}"
cat > /tmp/server.properties <<CONF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:9093
listeners=PLAINTEXT://0.0.0.0:${port},CONTROLLER://127.0.0.1:9093
advertised.listeners=PLAINTEXT://127.0.0.1:${port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=/tmp/kafka-data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
message.max.bytes=10485760
CONF
cat > /tmp/log4j2.properties <<CONF
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka.server.KafkaRaftServer
logger.kafka.level = INFO
CONF
set -f  # the classpath wildcard is for java, not the shell
java="java -Xms256m -Xmx1g -Dlog4j2.configurationFile=/tmp/log4j2.properties -cp /opt/kafka/lib/*"
$java kafka.tools.StorageTool format -t "$(cat /proc/sys/kernel/random/uuid | tr -d - | head -c 22)" \
    -c /tmp/server.properties --standalone --ignore-formatted >/dev/null
exec $java kafka.Kafka /tmp/server.properties
