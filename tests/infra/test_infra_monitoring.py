"""Alarms for failed runs, Lambda errors and dead letters, all to the one encrypted notification topic."""
from __future__ import annotations

from cdk_templates import logical_id, one, resources

from infra.nag import render_intrinsics


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
    services = set()
    for statement in key["Properties"]["KeyPolicy"]["Statement"]:
        service = statement["Principal"].get("Service", [])
        services.update([service] if isinstance(service, str) else service)
    assert {"cloudwatch.amazonaws.com", "budgets.amazonaws.com"} <= services
    _, topic = one(full.pipeline, "AWS::SNS::Topic", "NotificationsTopic")
    assert topic["Properties"]["KmsMasterKeyId"] == {"Fn::GetAtt": [key_id, "Arn"]}
    mails = sorted(s["Properties"]["Endpoint"] for s in resources(full.pipeline, "AWS::SNS::Subscription").values()
                   if s["Properties"]["Protocol"] == "email")
    assert mails == ["lab@example.org", "ops@example.org"]
    assert not resources(lean.pipeline, "AWS::SNS::Subscription")


def topic_policy_statements(synth) -> list[dict]:
    _, policy = one(synth.pipeline, "AWS::SNS::TopicPolicy", "NotificationsTopicPolicy")
    return policy["Properties"]["PolicyDocument"]["Statement"]


def test_cloudwatch_and_budgets_may_publish_to_the_topic_for_this_account_only(synth):
    """enforce_ssl replaced SNS's default topic policy: each publishing service needs its own Allow."""
    topic = {"Ref": logical_id(synth.pipeline_stack.notifications.topic)}
    account = synth.config.account or "<AWS::AccountId>"
    allows = {s["Principal"]["Service"]: s for s in topic_policy_statements(synth) if s["Effect"] == "Allow"}
    assert set(allows) == {"cloudwatch.amazonaws.com", "budgets.amazonaws.com"}
    for statement in allows.values():
        assert statement["Action"] == "sns:Publish" and statement["Resource"] == topic
        assert render_intrinsics(statement["Condition"]["StringEquals"]["aws:SourceAccount"]) == account
    arns = {service: render_intrinsics(statement["Condition"]["ArnLike"]["aws:SourceArn"])
            for service, statement in allows.items()}
    assert arns == {"cloudwatch.amazonaws.com": f"arn:aws:cloudwatch:{synth.pipeline_stack.region}:{account}:alarm:*",
                    "budgets.amazonaws.com": f"arn:aws:budgets::{account}:*"}
    # plain HTTP is still refused to everyone
    (deny,) = [s for s in topic_policy_statements(synth) if s["Effect"] == "Deny"]
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_monthly_budget_notifies_the_topic(full, lean):
    _, budget = one(full.pipeline, "AWS::Budgets::Budget", "NotificationsMonthlyBudget")
    props = budget["Properties"]
    assert props["Budget"]["BudgetLimit"] == {"Amount": 500, "Unit": "USD"}
    assert (props["Budget"]["BudgetType"], props["Budget"]["TimeUnit"]) == ("COST", "MONTHLY")
    topic = {"Ref": logical_id(full.pipeline_stack.notifications.topic)}
    notices = {(n["Notification"]["NotificationType"], n["Notification"]["Threshold"]): n["Subscribers"]
               for n in props["NotificationsWithSubscribers"]}
    assert notices == {("ACTUAL", 80): [{"SubscriptionType": "SNS", "Address": topic}],
                       ("FORECASTED", 100): [{"SubscriptionType": "SNS", "Address": topic}]}
    assert not resources(lean.pipeline, "AWS::Budgets::Budget")  # no amount configured, no budget
