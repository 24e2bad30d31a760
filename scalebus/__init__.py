"""scalebus: an Azure Service Bus queue driving a self-sizing fleet of worker VMs."""
