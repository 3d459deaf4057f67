"""Notifications and alarms: one SNS topic for run results and operational alarms.

Lab staff hear when a slide is done or why it failed; ops hear when something needs a person
(failed executions, Lambda errors, undelivered events waiting in a dead-letter queue) or when the
month's cost heads past the configured budget.

``enforce_ssl`` gives the topic a policy, which replaces SNS's default one: every service that
publishes (CloudWatch alarms, AWS Budgets) is allowed by a statement of its own, limited to this
account's alarms and budgets, and may use the topic's key.
"""
from __future__ import annotations

from aws_cdk import ArnFormat, Duration, Stack
from aws_cdk import aws_budgets as budgets
from aws_cdk import aws_cloudwatch as cloudwatch
from aws_cdk import aws_cloudwatch_actions as cloudwatch_actions
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subscriptions
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from infra.config import AtlasConfig


class Notifications(Construct):
    """The SNS topic everything reports to, encrypted with its own key, with e-mail subscriptions.

    A customer managed key (not ``alias/aws/sns``) because CloudWatch alarms can only publish
    to an encrypted topic whose key policy lets the CloudWatch service use the key.

    Attributes
    ----------
    topic : sns.Topic
    key : kms.Key
    budget : budgets.CfnBudget or None
        The account's monthly cost budget (``monthly_budget_usd``): 80 % spent, or 100 % forecast, notify.
    """

    def __init__(self, scope: Construct, id: str, *, config: AtlasConfig) -> None:
        super().__init__(scope, id)
        self.key = kms.Key(self, "Key", enable_key_rotation=True,
                           description=f"Encrypts the {config.name('notifications')} SNS topic")
        self.topic = sns.Topic(self, "Topic", topic_name=config.name("notifications"),
                               display_name="Tissue Atlas", master_key=self.key, enforce_ssl=True)
        stack = Stack.of(self)
        for service, sid, source_arn in (
                ("cloudwatch", "CloudWatchAlarmsPublish",
                 stack.format_arn(service="cloudwatch", resource="alarm", resource_name="*",
                                  arn_format=ArnFormat.COLON_RESOURCE_NAME)),
                ("budgets", "BudgetsPublish", f"arn:{stack.partition}:budgets::{stack.account}:*")):
            principal = iam.ServicePrincipal(f"{service}.amazonaws.com")
            self.key.grant(principal, "kms:Decrypt", "kms:GenerateDataKey*")
            self.topic.add_to_resource_policy(iam.PolicyStatement(
                sid=sid, principals=[principal], actions=["sns:Publish"], resources=[self.topic.topic_arn],
                conditions={"StringEquals": {"aws:SourceAccount": stack.account},
                            "ArnLike": {"aws:SourceArn": source_arn}}))
        for email in config.notification_emails:
            self.topic.add_subscription(subscriptions.EmailSubscription(email))
        self.budget = None
        if config.monthly_budget_usd is not None:
            self.budget = budgets.CfnBudget(self, "MonthlyBudget", budget=budgets.CfnBudget.BudgetDataProperty(
                budget_name=config.name("monthly"), budget_type="COST", time_unit="MONTHLY",
                budget_limit=budgets.CfnBudget.SpendProperty(amount=config.monthly_budget_usd, unit="USD")),
                notifications_with_subscribers=[
                    budgets.CfnBudget.NotificationWithSubscribersProperty(
                        notification=budgets.CfnBudget.NotificationProperty(
                            notification_type=kind, comparison_operator="GREATER_THAN", threshold=percent,
                            threshold_type="PERCENTAGE"),
                        subscribers=[budgets.CfnBudget.SubscriberProperty(subscription_type="SNS",
                                                                          address=self.topic.topic_arn)])
                    for kind, percent in (("ACTUAL", 80), ("FORECASTED", 100))])
            # Budgets checks at creation that it may publish to the topic.
            self.budget.node.add_dependency(self.topic)


class Alarms(Construct):
    """Alarms that page the notification topic; each fires on the first occurrence.

    Attributes
    ----------
    alarms : list of cloudwatch.Alarm
    """

    def __init__(self, scope: Construct, id: str, *, topic: sns.ITopic, state_machine: sfn.StateMachine,
                 functions: dict[str, lambda_.IFunction], dead_letter_queues: dict[str, sqs.IQueue]) -> None:
        super().__init__(scope, id)
        period = Duration.minutes(5)
        metrics = {
            "ExecutionsFailed": (state_machine.metric_failed(period=period),
                                 "A slide's run failed; the catalog item and the notification say why."),
            "ExecutionsTimedOut": (state_machine.metric_timed_out(period=period),
                                   "A slide's run exceeded the state machine timeout."),
        }
        for name, function in functions.items():
            metrics[f"{name.capitalize()}Errors"] = (function.metric_errors(period=period),
                                        f"The {name} Lambda raised; see its log group.")
        for name, queue in dead_letter_queues.items():
            metrics[f"{name.capitalize()}DeadLetters"] = (
                queue.metric_approximate_number_of_messages_visible(period=period),
                f"Events for {name} could not be delivered or processed; inspect and redrive the queue.")
        self.alarms = []
        for alarm_id, (metric, description) in metrics.items():
            alarm = metric.create_alarm(
                self, alarm_id, threshold=1, evaluation_periods=1, alarm_description=description,
                comparison_operator=cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
                treat_missing_data=cloudwatch.TreatMissingData.NOT_BREACHING)
            alarm.add_alarm_action(cloudwatch_actions.SnsAction(topic))
            self.alarms.append(alarm)
