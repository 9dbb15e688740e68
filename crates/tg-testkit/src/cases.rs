//! The tests.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tg_backend_api::{
    BackendExt, Capabilities, ConsumerOptions, ConsumerType, ErrorKind, InitialPosition,
    OutboundMessage, Qos, DEDUP_ID_PROPERTY,
};
use tg_schema::trustgraph::TextCompletionRequest;

use crate::check::{drain, ensure, expect_nothing, text, Ctx, Failure, TestResult};
use crate::Case;

/// How long a test waits for a message it expects.
const EXPECT: Duration = Duration::from_secs(15);
/// How long a test waits to be sure nothing comes.
const QUIET: Duration = Duration::from_millis(700);

type Needs = fn(&Capabilities) -> Result<(), &'static str>;

fn lacks_a_type(c: &Capabilities) -> Result<(), &'static str> {
    if c.shared && c.exclusive && c.failover {
        Err("a consumer type it lacks (it has all)")
    } else {
        Ok(())
    }
}

fn any(_: &Capabilities) -> Result<(), &'static str> {
    Ok(())
}

macro_rules! need {
    ($($flag:ident),+) => {
        |c: &Capabilities| {
            $( if !c.$flag { return Err(stringify!($flag)); } )+
            Ok(())
        }
    };
}

macro_rules! case {
    ($name:ident, $qos:expr, $needs:expr) => {
        Case {
            name: stringify!($name),
            qos: $qos,
            needs: $needs,
            run: |ctx| Box::pin($name(ctx)),
        }
    };
}

pub(crate) fn all() -> Vec<Case> {
    let ack_durable: Needs = need!(acknowledgement, durable_subscriptions);
    let payload_limit: Needs = |c| {
        if c.max_payload == 0 || c.max_payload > 64 * 1024 * 1024 {
            Err("a max_payload of at most 64 MiB to test against")
        } else {
            Ok(())
        }
    };
    vec![
        case!(round_trip_with_properties, Qos::Q1, any),
        Case {
            name: "round_trip_with_properties_q0",
            qos: Qos::Q0,
            needs: any,
            run: |ctx| Box::pin(round_trip_with_properties(ctx)),
        },
        Case {
            name: "round_trip_with_properties_q2",
            qos: Qos::Q2,
            needs: any,
            run: |ctx| Box::pin(round_trip_with_properties(ctx)),
        },
        case!(typed_round_trip, Qos::Q1, any),
        case!(fan_out_to_two_subscriptions, Qos::Q1, any),
        Case {
            name: "fan_out_to_two_subscriptions_q0",
            qos: Qos::Q0,
            needs: any,
            run: |ctx| Box::pin(fan_out_to_two_subscriptions(ctx)),
        },
        case!(q0_reaches_only_connected_subscriptions, Qos::Q0, any),
        case!(shared_consumers_split_messages, Qos::Q1, need!(shared)),
        case!(exclusive_refuses_second_consumer, Qos::Q1, need!(exclusive)),
        case!(failover_takes_over, Qos::Q1, need!(failover)),
        case!(
            unsupported_consumer_types_are_refused,
            Qos::Q1,
            lacks_a_type
        ),
        Case {
            name: "unsupported_consumer_types_are_refused_q0",
            qos: Qos::Q0,
            needs: lacks_a_type,
            run: |ctx| Box::pin(unsupported_consumer_types_are_refused(ctx)),
        },
        case!(latest_skips_earlier_messages, Qos::Q1, any),
        case!(earliest_replays_retained_messages, Qos::Q1, need!(earliest)),
        case!(ack_removes_message, Qos::Q1, ack_durable),
        case!(
            nack_redelivers_with_higher_count,
            Qos::Q1,
            need!(nack_redelivery)
        ),
        case!(
            close_without_ack_redelivers,
            Qos::Q1,
            need!(redeliver_unacked_on_close, durable_subscriptions)
        ),
        case!(
            unsubscribe_deletes_subscription,
            Qos::Q1,
            need!(durable_subscriptions)
        ),
        case!(
            delete_topic_removes_messages_and_subscriptions,
            Qos::Q1,
            need!(durable_subscriptions)
        ),
        case!(receive_times_out, Qos::Q1, any),
        case!(per_producer_order, Qos::Q1, need!(ordered)),
        case!(
            ten_thousand_messages_none_lost_none_duplicated,
            Qos::Q1,
            any
        ),
        case!(
            payload_at_limit_passes_over_limit_fails,
            Qos::Q1,
            payload_limit
        ),
        case!(undecodable_payload_gives_decode_error, Qos::Q1, any),
        case!(q2_deduplicates_by_message_id, Qos::Q2, need!(deduplication)),
        case!(
            retained_message_reaches_new_subscriber,
            Qos::Q1,
            need!(retained)
        ),
        case!(
            retain_refused_when_unsupported,
            Qos::Q1,
            |c| if c.retained {
                Err("no retained support (it has it)")
            } else {
                Ok(())
            }
        ),
        case!(invalid_subscription_is_refused, Qos::Q1, any),
        case!(closed_producer_and_consumer_refuse_work, Qos::Q1, any),
        case!(batch_respects_max_and_order, Qos::Q1, any),
        case!(batch_is_empty_on_timeout, Qos::Q1, any),
        case!(
            batch_partial_ack_then_close_redelivers_the_rest,
            Qos::Q1,
            need!(redeliver_unacked_on_close, durable_subscriptions)
        ),
        case!(batch_nack_of_some, Qos::Q1, need!(nack_redelivery)),
        case!(
            send_batch_checks_every_payload_first,
            Qos::Q1,
            payload_limit
        ),
    ]
}

/// Sends `n` messages `0`, `1`, … in one `send_batch` and waits for every receipt.
async fn send_numbered_batch(ctx: &Ctx, topic: &tg_backend_api::Topic, n: usize) -> TestResult {
    let producer = ctx.producer(topic).await?;
    let batch = (0..n)
        .map(|i| OutboundMessage::new(i.to_string()))
        .collect();
    let receipts = producer.send_batch(batch).await?;
    ensure!(
        receipts.len() == n,
        "{} receipts for {n} messages",
        receipts.len()
    );
    for receipt in receipts {
        receipt.await?;
    }
    producer.close().await?;
    Ok(())
}

/// Sends `n` messages `0`, `1`, … one by one, each accepted before the next is sent, so no two
/// share a broker-side batch (Pulsar acknowledges those whole: acknowledging part of one is
/// undone by a redelivery of the batch, see docs/pulsar.md).
async fn send_numbered_one_by_one(
    ctx: &Ctx,
    topic: &tg_backend_api::Topic,
    n: usize,
) -> TestResult {
    let producer = ctx.producer(topic).await?;
    for i in 0..n {
        producer
            .send(OutboundMessage::new(i.to_string()))
            .await?
            .await?;
    }
    producer.close().await?;
    Ok(())
}

/// Receives batches of at most `max` until `n` messages came (or `EXPECT` passed with none).
async fn receive_batches(
    consumer: &dyn tg_backend_api::Consumer,
    n: usize,
    max: usize,
) -> std::result::Result<Vec<tg_backend_api::Message>, Failure> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = consumer.receive_batch(max, EXPECT).await?;
        ensure!(
            !batch.is_empty(),
            "no batch within {EXPECT:?} after {} of {n}",
            got.len()
        );
        ensure!(
            batch.len() <= max,
            "a batch of {} with max {max}",
            batch.len()
        );
        got.extend(batch);
    }
    Ok(got)
}

async fn batch_respects_max_and_order(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("batch-order");
    let consumer = ctx.consumer(&topic, "batches").await?;
    send_numbered_batch(&ctx, &topic, 25).await?;
    let got = receive_batches(&*consumer, 25, 4).await?;
    let texts: Vec<String> = got.iter().map(text).collect();
    if ctx.caps.ordered {
        let sent: Vec<String> = (0..25).map(|i| i.to_string()).collect();
        ensure!(texts == sent, "batches gave {texts:?}");
    } else {
        let distinct: HashSet<&String> = texts.iter().collect();
        ensure!(distinct.len() == 25, "batches gave {texts:?}");
    }
    consumer.acknowledge_batch(&got).await?;
    let err = consumer.receive_batch(0, QUIET).await.unwrap_err();
    ensure!(err.kind() == ErrorKind::InvalidInput, "max 0 gave {err}");
    Ok(())
}

async fn batch_is_empty_on_timeout(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("batch-empty");
    let consumer = ctx.consumer(&topic, "nothing").await?;
    let started = Instant::now();
    let batch = consumer.receive_batch(10, QUIET).await?;
    ensure!(
        batch.is_empty(),
        "got {} messages from an empty topic",
        batch.len()
    );
    ensure!(
        started.elapsed() >= QUIET.mul_f32(0.9),
        "returned after {:?}, before the timeout {QUIET:?}",
        started.elapsed()
    );
    Ok(())
}

async fn batch_partial_ack_then_close_redelivers_the_rest(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("batch-partial");
    let first = ctx.consumer(&topic, "partial").await?;
    send_numbered_one_by_one(&ctx, &topic, 6).await?;
    let got = receive_batches(&*first, 6, 6).await?;
    let (done, open) = got.split_at(3);
    first.acknowledge_batch(done).await?;
    first.close().await?;
    let second = ctx.consumer(&topic, "partial").await?;
    let again = drain(&*second, 6, QUIET.max(Duration::from_secs(3))).await?;
    let mut expected: Vec<String> = open.iter().map(text).collect();
    let mut texts: Vec<String> = again.iter().map(text).collect();
    expected.sort();
    texts.sort();
    ensure!(
        texts == expected,
        "after acknowledging {:?} and closing, the subscription gave {texts:?}",
        done.iter().map(text).collect::<Vec<_>>()
    );
    Ok(())
}

async fn batch_nack_of_some(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("batch-nack");
    let consumer = ctx.consumer(&topic, "picky").await?;
    send_numbered_batch(&ctx, &topic, 5).await?;
    let got = receive_batches(&*consumer, 5, 5).await?;
    let (nacked, acked): (Vec<_>, Vec<_>) = got
        .into_iter()
        .partition(|m| text(m) == "1" || text(m) == "3");
    consumer.acknowledge_batch(&acked).await?;
    consumer.negative_acknowledge_batch(&nacked).await?;
    let again = drain(&*consumer, 2, EXPECT).await?;
    let mut texts: Vec<String> = again.iter().map(text).collect();
    texts.sort();
    ensure!(texts == ["1", "3"], "after nacking 1 and 3 got {texts:?}");
    if ctx.caps.redelivery_count {
        ensure!(
            again.iter().all(|m| m.redelivery_count() >= 1),
            "redelivery counts {:?}",
            again
                .iter()
                .map(|m| m.redelivery_count())
                .collect::<Vec<_>>()
        );
    }
    expect_nothing(&*consumer, QUIET, "after the nacked ones came back").await
}

async fn send_batch_checks_every_payload_first(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("batch-limit");
    let consumer = ctx.consumer(&topic, "limits").await?;
    let producer = ctx.producer(&topic).await?;
    let too_big = vec![b'x'; ctx.caps.max_payload + 1];
    let err = producer
        .send_batch(vec![
            OutboundMessage::new("fits"),
            OutboundMessage::new(too_big),
        ])
        .await
        .unwrap_err();
    ensure!(err.kind() == ErrorKind::PayloadTooLarge, "got {err}");
    expect_nothing(&*consumer, QUIET, "a batch with a too-large message").await?;
    let receipts = producer.send_batch(Vec::new()).await?;
    ensure!(
        receipts.is_empty(),
        "an empty batch gave {} receipts",
        receipts.len()
    );
    Ok(())
}

async fn round_trip_with_properties(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("round-trip");
    let consumer = ctx.consumer(&topic, "rt").await?;
    let producer = ctx.producer(&topic).await?;
    let msg = OutboundMessage::new("hello 🌍")
        .property("id", "req-1")
        .property("content-type", "text/plain")
        .property("empty", "");
    let sent_id = producer.send(msg).await?.await?;
    let got = consumer.receive(EXPECT).await?;
    ensure!(
        got.payload().as_ref() == "hello 🌍".as_bytes(),
        "payload changed: {:?}",
        text(&got)
    );
    for (k, v) in [
        ("id", "req-1"),
        ("content-type", "text/plain"),
        ("empty", ""),
    ] {
        ensure!(
            got.property(k) == Some(v),
            "property {k}: expected {v:?}, got {:?} (all: {:?})",
            got.property(k),
            got.properties()
        );
    }
    let user_props = got
        .properties()
        .keys()
        .filter(|k| !k.starts_with("tg-"))
        .count();
    ensure!(
        user_props == 3,
        "unexpected properties: {:?}",
        got.properties()
    );
    ensure!(
        got.redelivery_count() == 0,
        "first delivery has redelivery count {}",
        got.redelivery_count()
    );
    let _ = sent_id;
    consumer.acknowledge(&got).await?;
    producer.close().await?;
    consumer.close().await?;
    Ok(())
}

async fn typed_round_trip(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("typed");
    let consumer = ctx
        .backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new("typed"))
        .await?;
    let producer = ctx
        .backend
        .typed_producer::<TextCompletionRequest>(&topic)
        .await?;
    let without = TextCompletionRequest {
        system: "be brief".into(),
        prompt: "hi".into(),
        streaming: true,
        ..Default::default()
    };
    let with_empty = TextCompletionRequest {
        schema: Some(BTreeMap::new()),
        ..without.clone()
    };
    producer.send(&without).await?;
    producer
        .send_with(&with_empty, [("id".to_owned(), "7".to_owned())].into())
        .await?;
    let a = consumer.receive(EXPECT).await?;
    let b = consumer.receive(EXPECT).await?;
    let (a, b) = if a.value().schema.is_none() {
        (a, b)
    } else {
        (b, a)
    };
    ensure!(
        a.value() == &without,
        "decoded {:?}, sent {:?}",
        a.value(),
        without
    );
    ensure!(
        b.value() == &with_empty,
        "decoded {:?}, sent {:?}",
        b.value(),
        with_empty
    );
    ensure!(
        !a.message().payload().windows(8).any(|w| w == b"metadata"),
        "None field was written: {}",
        text(a.message())
    );
    ensure!(
        b.property("id") == Some("7"),
        "property lost: {:?}",
        b.message().properties()
    );
    consumer.acknowledge(&a).await?;
    consumer.acknowledge(&b).await?;
    Ok(())
}

async fn fan_out_to_two_subscriptions(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("fan-out");
    let one = ctx.consumer(&topic, "one").await?;
    let two = ctx.consumer(&topic, "two").await?;
    let producer = ctx.producer(&topic).await?;
    for i in 0..20 {
        producer
            .send(OutboundMessage::new(format!("m{i}")))
            .await?
            .await?;
    }
    for (name, c) in [("one", &one), ("two", &two)] {
        let got: HashSet<String> = drain(&**c, 20, EXPECT).await?.iter().map(text).collect();
        ensure!(
            got.len() == 20,
            "subscription {name} got {} of 20 distinct messages",
            got.len()
        );
    }
    Ok(())
}

async fn q0_reaches_only_connected_subscriptions(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("q0-connected");
    let producer = ctx.producer(&topic).await?;
    producer.send(OutboundMessage::new("before")).await?.await?;
    let consumer = ctx.consumer(&topic, "late").await?;
    producer.send(OutboundMessage::new("after")).await?.await?;
    let got = consumer.receive(EXPECT).await?;
    ensure!(
        text(&got) == "after",
        "a q0 subscriber created later received {:?}",
        text(&got)
    );
    consumer.acknowledge(&got).await?;
    expect_nothing(&*consumer, QUIET, "after the only live message").await
}

async fn shared_consumers_split_messages(ctx: Ctx) -> TestResult {
    const N: usize = 200;
    let topic = ctx.topic("shared");
    let opts = ConsumerOptions::new("workers").consumer_type(ConsumerType::Shared);
    let a: Arc<dyn tg_backend_api::Consumer> = ctx
        .backend
        .create_consumer(&topic, opts.clone())
        .await?
        .into();
    let b: Arc<dyn tg_backend_api::Consumer> =
        ctx.backend.create_consumer(&topic, opts).await?.into();
    let producer = ctx.producer(&topic).await?;
    let worker = |c: Arc<dyn tg_backend_api::Consumer>| {
        tokio::spawn(async move {
            let mut seen = Vec::new();
            loop {
                match c.receive(Duration::from_secs(3)).await {
                    Ok(m) => {
                        // a little work per message, so that a consumer holding work lets the other take some
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        c.acknowledge(&m).await?;
                        seen.push(text(&m));
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => {
                        return Ok::<_, tg_backend_api::Error>(seen)
                    }
                    Err(e) => return Err(e),
                }
            }
        })
    };
    let (ta, tb) = (worker(a.clone()), worker(b.clone()));
    for i in 0..N {
        producer
            .send(OutboundMessage::new(format!("m{i}")))
            .await?
            .await?;
    }
    let seen_a = ta.await.map_err(|e| Failure::from(e.to_string()))??;
    let seen_b = tb.await.map_err(|e| Failure::from(e.to_string()))??;
    let set_a: HashSet<_> = seen_a.iter().cloned().collect();
    let set_b: HashSet<_> = seen_b.iter().cloned().collect();
    let both: Vec<_> = set_a.intersection(&set_b).collect();
    ensure!(
        both.is_empty(),
        "{} messages were delivered to both consumers, e.g. {:?}",
        both.len(),
        both.first()
    );
    ensure!(
        set_a.len() + set_b.len() == N,
        "{} + {} distinct messages received, {N} sent",
        set_a.len(),
        set_b.len()
    );
    ensure!(
        seen_a.len() + seen_b.len() == N,
        "duplicates within a consumer: {} + {} deliveries for {N} messages",
        seen_a.len(),
        seen_b.len()
    );
    ensure!(
        !set_a.is_empty() && !set_b.is_empty(),
        "one consumer got everything ({} / {}): they do not compete",
        set_a.len(),
        set_b.len()
    );
    Ok(())
}

async fn exclusive_refuses_second_consumer(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("exclusive");
    let opts = ConsumerOptions::new("solo").consumer_type(ConsumerType::Exclusive);
    let first = ctx.backend.create_consumer(&topic, opts.clone()).await?;
    match ctx.backend.create_consumer(&topic, opts.clone()).await {
        Ok(_) => {
            return Err(Failure::from(
                "a second exclusive consumer was accepted".to_owned(),
            ))
        }
        Err(e) => ensure!(
            e.kind() == ErrorKind::ConsumerBusy,
            "second exclusive consumer: expected ConsumerBusy, got {e}"
        ),
    }
    let producer = ctx.producer(&topic).await?;
    producer.send(OutboundMessage::new("x")).await?.await?;
    let got = first.receive(EXPECT).await?;
    first.acknowledge(&got).await?;
    first.close().await?;
    // once the first is gone, a new exclusive consumer is accepted
    let deadline = Instant::now() + EXPECT;
    loop {
        match ctx.backend.create_consumer(&topic, opts.clone()).await {
            Ok(c) => return Ok(c.close().await?),
            Err(e) if e.kind() == ErrorKind::ConsumerBusy && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => {
                return Err(Failure::from(format!(
                    "exclusive consumer after the first closed: {e}"
                )))
            }
        }
    }
}

async fn failover_takes_over(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("failover");
    let opts = ConsumerOptions::new("ha").consumer_type(ConsumerType::Failover);
    let active = ctx.backend.create_consumer(&topic, opts.clone()).await?;
    let standby = ctx.backend.create_consumer(&topic, opts).await?;
    let producer = ctx.producer(&topic).await?;
    for i in 0..5 {
        producer
            .send(OutboundMessage::new(format!("a{i}")))
            .await?
            .await?;
    }
    // exactly one of the two is active; find out which by who receives
    let (active, standby) = match active.receive(Duration::from_secs(3)).await {
        Ok(m) => {
            active.acknowledge(&m).await?;
            (active, standby)
        }
        Err(e) if e.kind() == ErrorKind::Timeout => {
            let m = standby.receive(EXPECT).await?;
            standby.acknowledge(&m).await?;
            (standby, active)
        }
        Err(e) => return Err(e.into()),
    };
    let rest = drain(&*active, 4, EXPECT).await?;
    ensure!(
        rest.len() == 4,
        "active consumer got {} of the remaining 4",
        rest.len()
    );
    expect_nothing(&*standby, QUIET, "standby while the active consumer lives").await?;
    producer.send(OutboundMessage::new("held")).await?.await?;
    let held = active.receive(EXPECT).await?;
    ensure!(
        text(&held) == "held",
        "active consumer got {:?}",
        text(&held)
    );
    active.close().await?;
    producer.send(OutboundMessage::new("b")).await?.await?;
    let got: HashSet<String> = drain(&*standby, 2, EXPECT)
        .await?
        .iter()
        .map(text)
        .collect();
    ensure!(got.contains("b"), "standby did not take over: got {got:?}");
    if ctx.caps.redeliver_unacked_on_close {
        ensure!(
            got.contains("held"),
            "the message the active consumer held unacked was not handed over: {got:?}"
        );
    }
    Ok(())
}

async fn unsupported_consumer_types_are_refused(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("unsupported");
    if !ctx.caps.shared {
        // one consumer per subscription is fine; a second, competing one is refused
        let first = ctx
            .backend
            .create_consumer(&topic, ConsumerOptions::new("one"))
            .await?;
        match ctx
            .backend
            .create_consumer(&topic, ConsumerOptions::new("one"))
            .await
        {
            Ok(_) => {
                return Err(Failure::from(
                    "a second consumer of one subscription was accepted though shared is false"
                        .to_owned(),
                ))
            }
            Err(e) => ensure!(
                e.kind() == ErrorKind::Unsupported,
                "second consumer: expected Unsupported, got {e}"
            ),
        }
        first.close().await?;
    }
    for ty in [ConsumerType::Exclusive, ConsumerType::Failover] {
        if ctx.caps.supports(ty) {
            continue;
        }
        match ctx
            .backend
            .create_consumer(&topic, ConsumerOptions::new("u").consumer_type(ty))
            .await
        {
            Ok(_) => {
                return Err(Failure::from(format!(
                    "{ty} consumer accepted though capabilities say no"
                )))
            }
            Err(e) => ensure!(
                e.kind() == ErrorKind::Unsupported,
                "{ty}: expected Unsupported, got {e}"
            ),
        }
    }
    Ok(())
}

async fn latest_skips_earlier_messages(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("latest");
    let producer = ctx.producer(&topic).await?;
    producer.send(OutboundMessage::new("old")).await?.await?;
    let consumer = ctx
        .backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("late").initial_position(InitialPosition::Latest),
        )
        .await?;
    producer.send(OutboundMessage::new("new")).await?.await?;
    let got = consumer.receive(EXPECT).await?;
    ensure!(
        text(&got) == "new",
        "a Latest subscription received {:?} sent before it existed",
        text(&got)
    );
    consumer.acknowledge(&got).await?;
    expect_nothing(&*consumer, QUIET, "Latest subscription").await
}

async fn earliest_replays_retained_messages(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("earliest");
    let producer = ctx.producer(&topic).await?;
    for i in 0..3 {
        producer
            .send(OutboundMessage::new(format!("old{i}")))
            .await?
            .await?;
    }
    let consumer = ctx
        .backend
        .create_consumer(
            &topic,
            ConsumerOptions::new("replay").initial_position(InitialPosition::Earliest),
        )
        .await?;
    producer.send(OutboundMessage::new("new")).await?.await?;
    let got: Vec<String> = drain(&*consumer, 4, EXPECT)
        .await?
        .iter()
        .map(text)
        .collect();
    ensure!(
        got == ["old0", "old1", "old2", "new"],
        "Earliest subscription got {got:?}"
    );
    Ok(())
}

async fn ack_removes_message(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("ack");
    let consumer = ctx.consumer(&topic, "acker").await?;
    let producer = ctx.producer(&topic).await?;
    producer.send(OutboundMessage::new("once")).await?.await?;
    let got = consumer.receive(EXPECT).await?;
    consumer.acknowledge(&got).await?;
    consumer.acknowledge(&got).await?; // twice is fine
    consumer.close().await?;
    let again = ctx.consumer(&topic, "acker").await?;
    expect_nothing(&*again, QUIET, "after acknowledge and reconnect").await
}

async fn nack_redelivers_with_higher_count(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("nack");
    let consumer = ctx.consumer(&topic, "nacker").await?;
    let producer = ctx.producer(&topic).await?;
    producer
        .send(OutboundMessage::new("retry-me"))
        .await?
        .await?;
    let first = consumer.receive(EXPECT).await?;
    consumer.negative_acknowledge(&first).await?;
    let second = consumer.receive(EXPECT).await?;
    ensure!(
        text(&second) == "retry-me",
        "after nack got {:?}",
        text(&second)
    );
    if ctx.caps.redelivery_count {
        ensure!(
            second.redelivery_count() > first.redelivery_count(),
            "redelivery count did not rise: {} then {}",
            first.redelivery_count(),
            second.redelivery_count()
        );
    }
    consumer.acknowledge(&second).await?;
    expect_nothing(&*consumer, QUIET, "after acknowledging the redelivery").await
}

async fn close_without_ack_redelivers(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("close-unacked");
    let first = ctx.consumer(&topic, "crashy").await?;
    let producer = ctx.producer(&topic).await?;
    producer
        .send(OutboundMessage::new("unfinished"))
        .await?
        .await?;
    let got = first.receive(EXPECT).await?;
    ensure!(text(&got) == "unfinished", "got {:?}", text(&got));
    first.close().await?;
    let second = ctx.consumer(&topic, "crashy").await?;
    let again = second.receive(EXPECT).await?;
    ensure!(
        text(&again) == "unfinished",
        "after close got {:?}",
        text(&again)
    );
    if ctx.caps.redelivery_count {
        ensure!(
            again.redelivery_count() >= 1,
            "redelivery count is {} after close without ack",
            again.redelivery_count()
        );
    }
    second.acknowledge(&again).await?;
    Ok(())
}

async fn unsubscribe_deletes_subscription(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("unsubscribe");
    let consumer = ctx.consumer(&topic, "gone").await?;
    let producer = ctx.producer(&topic).await?;
    producer
        .send(OutboundMessage::new("left behind"))
        .await?
        .await?;
    consumer.unsubscribe().await?;
    let fresh = ctx.consumer(&topic, "gone").await?;
    expect_nothing(
        &*fresh,
        QUIET,
        "a new subscription of the same name after unsubscribe",
    )
    .await?;
    producer.send(OutboundMessage::new("after")).await?.await?;
    let got = fresh.receive(EXPECT).await?;
    ensure!(text(&got) == "after", "got {:?}", text(&got));
    fresh.acknowledge(&got).await?;
    Ok(())
}

/// `delete_topic` leaves nothing behind: neither messages (an Earliest consumer finds none) nor
/// a subscription's backlog; the topic works again afterwards, and deleting what does not exist
/// succeeds. A backend that cannot delete topics says so with `Unsupported` and its reason.
async fn delete_topic_removes_messages_and_subscriptions(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("deleted");
    let consumer = ctx.consumer(&topic, "kept").await?;
    let producer = ctx.producer(&topic).await?;
    for text in ["before-1", "before-2"] {
        producer.send(OutboundMessage::new(text)).await?.await?;
    }
    producer.close().await?;
    consumer.close().await?;
    match ctx.backend.delete_topic(&topic).await {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::Unsupported => {
            ensure!(!e.message().is_empty(), "Unsupported without a reason: {e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    }
    ctx.backend.delete_topic(&topic).await?;
    let fresh = ctx.consumer(&topic, "kept").await?;
    expect_nothing(&*fresh, QUIET, "the subscription of a deleted topic").await?;
    if ctx.caps.earliest {
        let replay = ctx
            .backend
            .create_consumer(
                &topic,
                ConsumerOptions::new("replay").initial_position(InitialPosition::Earliest),
            )
            .await?;
        expect_nothing(&*replay, QUIET, "an Earliest consumer of a deleted topic").await?;
        replay.close().await?;
    }
    let producer = ctx.producer(&topic).await?;
    producer.send(OutboundMessage::new("after")).await?.await?;
    let got = fresh.receive(EXPECT).await?;
    ensure!(text(&got) == "after", "got {:?}", text(&got));
    fresh.acknowledge(&got).await?;
    Ok(())
}

async fn receive_times_out(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("timeout");
    let consumer = ctx.consumer(&topic, "idle").await?;
    for asked in [Duration::from_millis(300), Duration::from_millis(50)] {
        let start = Instant::now();
        let err = match consumer.receive(asked).await {
            Ok(m) => {
                return Err(Failure::from(format!(
                    "received {:?} from an empty topic",
                    text(&m)
                )))
            }
            Err(e) => e,
        };
        let took = start.elapsed();
        ensure!(
            err.kind() == ErrorKind::Timeout,
            "expected Timeout, got {err}"
        );
        ensure!(
            took + Duration::from_millis(5) >= asked,
            "timed out after {took:?}, asked {asked:?}"
        );
        ensure!(
            took <= asked + Duration::from_millis(1500),
            "timed out after {took:?}, asked {asked:?}"
        );
    }
    Ok(())
}

async fn per_producer_order(ctx: Ctx) -> TestResult {
    const N: usize = 500;
    let topic = ctx.topic("order");
    let consumer = ctx.consumer(&topic, "ordered").await?;
    let producer = ctx.producer(&topic).await?;
    let mut receipts = Vec::with_capacity(N);
    for i in 0..N {
        receipts.push(producer.send(OutboundMessage::new(i.to_string())).await?);
    }
    for r in receipts {
        r.await?;
    }
    let got: Vec<usize> = drain(&*consumer, N, EXPECT)
        .await?
        .iter()
        .map(|m| text(m).parse().unwrap_or(usize::MAX))
        .collect();
    ensure!(got.len() == N, "received {} of {N}", got.len());
    let first_out_of_order = got.windows(2).position(|w| w[0] >= w[1]);
    ensure!(
        first_out_of_order.is_none(),
        "out of order at {:?}: {:?}",
        first_out_of_order,
        first_out_of_order.map(|i| &got[i..(i + 2)])
    );
    Ok(())
}

async fn ten_thousand_messages_none_lost_none_duplicated(ctx: Ctx) -> TestResult {
    const N: usize = 10_000;
    let topic = ctx.topic("ten-thousand");
    let consumer: Arc<dyn tg_backend_api::Consumer> = ctx.consumer(&topic, "all").await?.into();
    let producer = ctx.producer(&topic).await?;
    let reader = {
        let consumer = consumer.clone();
        tokio::spawn(async move { drain(&*consumer, N, EXPECT).await })
    };
    let mut receipts = Vec::with_capacity(N);
    for i in 0..N {
        receipts.push(
            producer
                .send(OutboundMessage::new(format!("{i:05}")))
                .await?,
        );
    }
    for r in receipts {
        r.await?;
    }
    producer.flush().await?;
    let got = reader.await.map_err(|e| Failure::from(e.to_string()))??;
    let distinct: HashSet<String> = got.iter().map(text).collect();
    ensure!(
        got.len() == distinct.len(),
        "{} duplicate deliveries",
        got.len() - distinct.len()
    );
    ensure!(
        distinct.len() == N,
        "{} of {N} messages lost",
        N - distinct.len()
    );
    expect_nothing(&*consumer, QUIET, "after all 10,000").await
}

async fn payload_at_limit_passes_over_limit_fails(ctx: Ctx) -> TestResult {
    let max = ctx.caps.max_payload;
    let topic = ctx.topic("payload-limit");
    let consumer = ctx.consumer(&topic, "big").await?;
    let producer = ctx.producer(&topic).await?;
    let at_limit = Bytes::from(vec![b'a'; max]);
    producer
        .send(OutboundMessage::new(at_limit.clone()))
        .await?
        .await?;
    let got = consumer.receive(EXPECT).await?;
    ensure!(
        got.payload().len() == max && got.payload() == &at_limit,
        "payload at the limit came back as {} bytes",
        got.payload().len()
    );
    consumer.acknowledge(&got).await?;
    match producer
        .send(OutboundMessage::new(vec![b'b'; max + 1]))
        .await
    {
        Ok(receipt) => {
            let outcome = receipt.await;
            return Err(Failure::from(format!("payload of max_payload + 1 = {} bytes was accepted for sending (receipt: {outcome:?})", max + 1)));
        }
        Err(e) => ensure!(
            e.kind() == ErrorKind::PayloadTooLarge,
            "expected PayloadTooLarge, got {e}"
        ),
    }
    expect_nothing(&*consumer, QUIET, "after the oversize send").await?;
    // the producer still works
    producer.send(OutboundMessage::new("small")).await?.await?;
    let small = consumer.receive(EXPECT).await?;
    ensure!(text(&small) == "small", "got {:?}", text(&small));
    Ok(())
}

async fn undecodable_payload_gives_decode_error(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("poison");
    let consumer = ctx
        .backend
        .typed_consumer::<TextCompletionRequest>(&topic, ConsumerOptions::new("strict"))
        .await?;
    let raw = ctx.producer(&topic).await?;
    raw.send(OutboundMessage::new("not json {")).await?.await?;
    raw.send(OutboundMessage::new(
        r#"{"system":"s","prompt":"p","streaming":"yes"}"#,
    ))
    .await?
    .await?;
    raw.send(OutboundMessage::new(
        r#"{"system":"s","prompt":"ok","streaming":null,"extra":1}"#,
    ))
    .await?
    .await?;
    for (bad, field) in [
        ("not json {", None),
        (
            r#"{"system":"s","prompt":"p","streaming":"yes"}"#,
            Some("streaming"),
        ),
    ] {
        let mut err = match consumer.receive(EXPECT).await {
            Ok(v) => return Err(Failure::from(format!("{bad:?} decoded as {:?}", v.value()))),
            Err(e) => e,
        };
        ensure!(
            err.kind() == ErrorKind::Decode,
            "expected Decode, got {err}"
        );
        ensure!(
            err.to_string().contains("TextCompletionRequest"),
            "error does not name the type: {err}"
        );
        if let Some(field) = field {
            ensure!(
                err.to_string().contains(field),
                "error does not name the field {field}: {err}"
            );
        }
        let msg = err
            .take_raw_message()
            .ok_or_else(|| Failure::from(format!("Decode error carries no raw message: {err}")))?;
        ensure!(
            msg.payload().as_ref() == bad.as_bytes(),
            "raw bytes differ: {:?}",
            text(&msg)
        );
        consumer.acknowledge(&msg).await?;
    }
    let good = consumer.receive(EXPECT).await?;
    ensure!(
        good.value().prompt == "ok" && !good.value().streaming,
        "lenient decode gave {:?}",
        good.value()
    );
    consumer.acknowledge(&good).await?;
    Ok(())
}

async fn q2_deduplicates_by_message_id(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("dedup");
    let consumer = ctx.consumer(&topic, "once").await?;
    let producer = ctx.producer(&topic).await?;
    for payload in ["first", "first-again"] {
        producer
            .send(OutboundMessage::new(payload).property(DEDUP_ID_PROPERTY, "same-id"))
            .await?
            .await?;
    }
    producer.send(OutboundMessage::new("second")).await?.await?;
    producer.send(OutboundMessage::new("third")).await?.await?;
    let got: Vec<String> = drain(&*consumer, 4, Duration::from_secs(3))
        .await?
        .iter()
        .map(text)
        .collect();
    ensure!(got == ["first", "second", "third"], "q2 delivered {got:?}");
    Ok(())
}

async fn retained_message_reaches_new_subscriber(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("retained");
    let producer = ctx.producer(&topic).await?;
    producer
        .send(OutboundMessage::new("status: ok").retain(true))
        .await?
        .await?;
    let consumer = ctx.consumer(&topic, "watcher").await?;
    let got = consumer.receive(EXPECT).await?;
    ensure!(text(&got) == "status: ok", "got {:?}", text(&got));
    consumer.acknowledge(&got).await?;
    Ok(())
}

async fn retain_refused_when_unsupported(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("no-retain");
    let producer = ctx.producer(&topic).await?;
    match producer.send(OutboundMessage::new("x").retain(true)).await {
        Ok(_) => Err(Failure::from(
            "retained send accepted though capabilities say no".to_owned(),
        )),
        Err(e) => {
            ensure!(
                e.kind() == ErrorKind::Unsupported,
                "expected Unsupported, got {e}"
            );
            Ok(())
        }
    }
}

async fn invalid_subscription_is_refused(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("bad-sub");
    for bad in ["", "has space", "a/b", "wild+", "wild#"] {
        match ctx
            .backend
            .create_consumer(&topic, ConsumerOptions::new(bad))
            .await
        {
            Ok(_) => return Err(Failure::from(format!("subscription name {bad:?} accepted"))),
            Err(e) => ensure!(
                e.kind() == ErrorKind::ConfigInvalid,
                "{bad:?}: expected ConfigInvalid, got {e}"
            ),
        }
    }
    Ok(())
}

async fn closed_producer_and_consumer_refuse_work(ctx: Ctx) -> TestResult {
    let topic = ctx.topic("closed");
    let producer = ctx.producer(&topic).await?;
    let consumer = ctx.consumer(&topic, "c").await?;
    producer.close().await?;
    consumer.close().await?;
    match producer.send(OutboundMessage::new("late")).await {
        Ok(r) => {
            return Err(Failure::from(format!(
                "closed producer accepted a message ({:?})",
                r.await
            )))
        }
        Err(e) => ensure!(
            e.kind() == ErrorKind::Closed,
            "send after close: expected Closed, got {e}"
        ),
    }
    match consumer.receive(Duration::from_millis(100)).await {
        Ok(_) => Err(Failure::from("closed consumer received".to_owned())),
        Err(e) => {
            ensure!(
                e.kind() == ErrorKind::Closed,
                "receive after close: expected Closed, got {e}"
            );
            Ok(())
        }
    }
}
