# First boot of a compute node: join ${domain} in ${ou}. The password comes from SSM Parameter Store
# (${password_parameter}) at boot; it is never baked into the image.
$ErrorActionPreference = 'Stop'
$password = (Get-SSMParameterValue -Name '${password_parameter}' -WithDecryption $true).Parameters[0].Value
$credential = New-Object PSCredential('${join_user}@${domain}', (ConvertTo-SecureString $password -AsPlainText -Force))
Add-Computer -DomainName '${domain}' -OUPath '${ou}' -Credential $credential -Restart
