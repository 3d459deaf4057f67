"""Alarms for failed runs, Lambda errors and dead letters, all to the one encrypted notification topic."""
from __future__ import annotations

from cdk_templates import logical_id, one, resources


def alarms_by_metric(synth) -> dict[tuple[str, str], dict]:
    return {(a["Properties"]["Namespace"], a["Properties"]["MetricName"],
             str(a["Properties"]["Dimensions"][0]["Value"])): a["Properties"]
            for a in resources(synth.pipeline, "AWS::CloudWatch::Alarm").values()}


def test_each_alarm_fires_on_the_first_occurrence_and_notifies_the_topic(synth):
    topic = {"Ref": logical_id(synth.pipeline_stack.notifications.topic)}
    alarms = resources(synth.pipeline, "AWS::CloudWatch::Alarm")
    assert len(alarms) == 2 + 3 + 3
    for alarm in alarms.values():
        props = alarm["Properties"]
        assert props["AlarmActions"] == [topic]
        assert (props["Threshold"], props["ComparisonOperator"]) == (1, "GreaterThanOrEqualToThreshold")
        assert props["TreatMissingData"] == "notBreaching"


def test_alarms_watch_executions_functions_and_dead_letter_queues(synth):
    stack = synth.pipeline_stack
    watched = {(ns, metric, value) for ns, metric, value in alarms_by_metric(synth)}
    machine = str({"Ref": logical_id(stack.pipeline.state_machine)})
    assert {("AWS/States", "ExecutionsFailed", machine), ("AWS/States", "ExecutionsTimedOut", machine)} <= watched
    for name, fn in stack.catalog.functions.items():
        assert ("AWS/Lambda", "Errors", str({"Ref": logical_id(fn)})) in watched, name
    for name, queue in stack.catalog.dead_letter_queues.items():
        assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible",
                str({"Fn::GetAtt": [logical_id(queue), "QueueName"]})) in watched, name


def test_topic_is_encrypted_with_a_key_cloudwatch_may_use_and_mails_each_address(full, lean):
    key_id, key = one(full.pipeline, "AWS::KMS::Key", "NotificationsKey")
    assert key["Properties"]["EnableKeyRotation"] is True
    services = [s["Principal"].get("Service") for s in key["Properties"]["KeyPolicy"]["Statement"]]
    assert "cloudwatch.amazonaws.com" in services
    _, topic = one(full.pipeline, "AWS::SNS::Topic", "NotificationsTopic")
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    mails = sorted(s["Properties"]["Endpoint"] for s in resources(full.pipeline, "AWS::SNS::Subscription").values()
                   if s["Properties"]["Protocol"] == "email")
    assert mails == ["lab@example.org", "ops@example.org"]
    assert not resources(lean.pipeline, "AWS::SNS::Subscription")
